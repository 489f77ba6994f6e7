"""DFM's modeler: one pass to fit the PCA, the reconstruction-error map upsampled, the model's own score."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.ops.filters import upsample_maps
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("dfm")
class DFMModeler(BaseModeler):
    """As the reference: the map is the pooled-grid reconstruction error resized bilinearly to the input
    (no smoothing); the image score is the model's (whole-vector FRE or Gaussian NLL), not the map's maximum."""

    one_pass = True

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return upsample_maps(outputs["patch_scores"], self.input_size(batch))

    def scores_from_maps(self, maps: torch.Tensor, outputs: dict) -> torch.Tensor:
        return outputs["image_scores"]
