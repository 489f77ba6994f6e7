"""PaDiM's modeler: one streaming pass to fit, Mahalanobis maps upsampled and smoothed to score."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("padim")
class PadimModeler(BaseModeler):
    """Bilinear upsampling of the distance grid to the input, Gaussian σ=4, image score = max (paper)."""

    one_pass = True

    def begin_fit(self, num_images: int, num_tiles: int | None = None) -> None:
        """A tiled ensemble (``model.tile_ensemble``) fits one Gaussian set per tile position: tells the model how many."""
        super().begin_fit(num_images, num_tiles)
        self.model.tile_positions = self.tile_group()

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.smooth_to_input(outputs["patch_scores"], self.input_size(batch), self.model.sigma)
