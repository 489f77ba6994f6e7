"""The modeler of the reconstruction models (AE, UNet-AE, VAE, UNet-VAE).

The four share one objective shape (the model's own criterion on its reconstruction) and one anomaly
map (the smoothed reconstruction error), so one small class serves them all.
"""
from __future__ import annotations

import torch

from models.model_base import reconstruction_error_map
from modelers.modeler_base import BaseModeler
from registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("unet_vae")
@MODELER_REGISTRY.register("vae")
@MODELER_REGISTRY.register("unet_ae")
@MODELER_REGISTRY.register("ae")
class ReconstructionModeler(BaseModeler):
    """Loss from the model's criterion; map = reconstruction error (``model.map_kind``), max as score."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return self.model.criterion(outputs, self.images(batch))

    def compute_anomaly_maps(self, outputs: dict, batch: dict) -> torch.Tensor:
        return reconstruction_error_map(self.images(batch), outputs["reconstruction"], self.model.map_kind,
                                        self.model.sigma)
