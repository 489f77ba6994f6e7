"""SimpleNet's and SuperSimpleNet's modelers: the official two learning rates (adaptor, discriminator)."""
from __future__ import annotations

from typing import Any

import torch

from anomaly_framework.errors import FrameworkError
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("simplenet")
class SimpleNetModeler(BaseModeler):
    """The model's loss, map and score; its adaptor and its discriminator heads train at their own rates."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return self.model.loss(outputs)

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.model.anomaly_map(outputs, self.input_size(batch))

    def scores_from_maps(self, maps: torch.Tensor, outputs: dict) -> torch.Tensor:
        return self.model.image_score(outputs)

    def configure_optimizers(self, num_epochs: int | None = None) -> tuple[torch.optim.Optimizer, Any]:
        """One Adam with two groups, as the official pair of optimisers: the heads at ``train.lr`` /
        ``train.weight_decay`` (L2 for ``adam``, decoupled for ``adamw``), the adaptor as AdamW at
        ``train.adaptor_lr`` / ``train.adaptor_weight_decay`` (decoupled: torch's AdamW is this Adam)."""
        train = {**self.config["train"], **({"epochs": num_epochs} if num_epochs else {})}
        if train["optimizer"] not in ("adam", "adamw"):
            raise FrameworkError(f"Config key 'train.optimizer' must be adam or adamw for {self.config['model']['name']}, "
                                 f"got {train['optimizer']!r}")
        adaptor = list(self.model.adaptor.parameters())
        adaptor_ids = {id(parameter) for parameter in adaptor}
        heads = [parameter for parameter in self.trainable_parameters() if id(parameter) not in adaptor_ids]
        optimizer = torch.optim.Adam([
            {"params": heads, "lr": train["lr"], "weight_decay": train["weight_decay"],
             "decoupled_weight_decay": train["optimizer"] == "adamw"},
            {"params": adaptor, "lr": train["adaptor_lr"], "weight_decay": train["adaptor_weight_decay"],
             "decoupled_weight_decay": True},
        ])
        return optimizer, self._scheduler(optimizer, train)


@MODELER_REGISTRY.register("supersimplenet")
class SuperSimpleNetModeler(SimpleNetModeler):
    """Same steps; the model's own loss parts (truncated L1, two focal terms) are logged."""
