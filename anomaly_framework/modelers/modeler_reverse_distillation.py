"""Reverse Distillation's modeler: the official cosine loss, and the summed level maps smoothed (σ 4)."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.ops.filters import gaussian_blur2d
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("reverse_distillation")
class ReverseDistillationModeler(BaseModeler):
    """The OCBE and the decoder train (the encoder's parameters do not require gradients); image score =
    maximum of the smoothed map, as the official evaluation."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.model.loss(outputs)}

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return gaussian_blur2d(self.model.anomaly_map(outputs, batch["image"].shape[-2:]), self.model.sigma)
