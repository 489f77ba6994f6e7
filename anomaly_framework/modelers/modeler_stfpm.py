"""STFPM's modeler: the official feature-matching loss, and the product of per-level distance maps."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("stfpm")
class STFPMModeler(BaseModeler):
    """Only the student trains (the teacher's parameters do not require gradients)."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.model.loss(outputs)}

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.model.anomaly_map(outputs, batch["image"].shape[-2:])

    def selection_maps(self, batch: dict) -> torch.Tensor:
        """The official selection averages the product map at the feature grid, before any resize."""
        self.model.eval()
        return self.model.grid_map(self.forward(batch))
