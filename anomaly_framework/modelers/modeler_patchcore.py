"""PatchCore's modeler: features and nearest-neighbour search timed apart, maps upsampled and smoothed."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("patchcore")
class PatchcoreModeler(BaseModeler):
    """Bilinear upsampling of the patch-distance grid, Gaussian σ=4 (official); image score from the model."""

    one_pass = True
    fit_stage = "coreset"

    def forward(self, batch: dict) -> dict:
        with self.timer("features"):
            embedding = self.model.embed(self.inputs(batch))
        with self.timer("search"):
            return self.model.score_patches(embedding)

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.smooth_to_input(outputs["patch_scores"], self.input_size(batch), self.model.sigma)

    def scores_from_maps(self, maps: torch.Tensor, outputs: dict) -> torch.Tensor:
        return outputs["image_scores"]
