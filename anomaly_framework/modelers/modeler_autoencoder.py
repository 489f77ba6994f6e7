"""The modeler of the autoencoders (AE, UNet-AE): the model's criterion, and the reconstruction-error map."""
from __future__ import annotations

import torch

from anomaly_framework.models.model_base import reconstruction_error_map
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("unet_ae")
@MODELER_REGISTRY.register("ae")
class AutoencoderModeler(BaseModeler):
    """Loss from the model's criterion; map = reconstruction error (``model.map_kind``), max as score."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return self.model.criterion(outputs, self.images(batch))

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        return reconstruction_error_map(self.images(batch), outputs["reconstruction"], self.model.map_kind,
                                        self.model.sigma)
