"""The modeler of the VAEs (VAE, UNet-VAE): the autoencoders' maps, and the KL term watched in training.

At evaluation the models reconstruct from μ (``model.eval()``), so maps are deterministic; training
reports the reconstruction and KL parts separately, so a collapsing posterior (KL → 0) is visible.
"""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_autoencoder import AutoencoderModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("unet_vae")
@MODELER_REGISTRY.register("vae")
class VAEModeler(AutoencoderModeler):
    """Adds the posterior's mean log-variance to the step report, next to the loss parts."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(outputs, batch)
        return {**losses, "mean_log_var": outputs["log_var"].detach().float().mean()}
