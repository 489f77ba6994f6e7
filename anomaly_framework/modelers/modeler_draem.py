"""DRAEM's modeler: trains on simulated anomalies, evaluates on plain images."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("draem")
class DraemModeler(BaseModeler):
    """Training batches carry ``augmented_image`` and ``anomaly_mask`` (from the classification trainer's
    simulation); the network sees the augmented image and must reconstruct the clean one.

    ``model.recompute_activations`` null (the default) recomputes activations on the CPU, where the
    activations of the official batch of 8 (about 8.6 GB at 256 px) would dominate the machine's memory,
    and keeps them on a GPU, where they fit and speed matters; the gradients are the same either way.
    """

    def to(self, device: torch.device) -> "DraemModeler":
        super().to(device)
        setting = self.config["model"]["recompute_activations"]
        self.model.set_recompute(device.type == "cpu" if setting is None else setting)
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        key = "augmented_image" if "augmented_image" in batch else "image"
        with self.timer("features"):
            return self.run_model(batch[key].to(self.device, non_blocking=True))

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        masks = batch["anomaly_mask"].to(self.device, non_blocking=True)
        return self.model.loss(outputs, self.images(batch), masks)

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.model.anomaly_map(outputs)

    def scores_from_maps(self, maps: torch.Tensor, outputs: dict) -> torch.Tensor:
        return self.model.image_score(maps)
