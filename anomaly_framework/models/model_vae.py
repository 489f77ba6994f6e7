"""Variational autoencoders for anomaly detection by reconstruction: vanilla and UNet.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014. The encoder and decoder are the
autoencoders' (``model_ae``); the KL term acts on the bottleneck only. At test time images are
reconstructed from μ, so maps are deterministic.
"""
from __future__ import annotations

import torch
from torch import nn

from anomaly_framework.models.model_ae import AELoss, ConvDecoder, ConvEncoder, UNetBody
from anomaly_framework.registry import MODEL_REGISTRY


def reparameterize(mu: torch.Tensor, log_var: torch.Tensor, training: bool) -> torch.Tensor:
    """z = μ + σ·ε while training; μ itself at test time."""
    if not training:
        return mu
    return mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)


class VAELoss(nn.Module):
    """Reconstruction (as ``AELoss``) + β · KL(q(z|x) ‖ N(0, I)).

    The KL is summed over latent units, averaged over the batch, then divided by the number of
    values per image (C·H·W), matching the per-pixel mean of the reconstruction term so that β means
    the same at every image size.
    """

    def __init__(self, recon: str = "l2+ssim", beta: float = 1.0) -> None:
        super().__init__()
        self.reconstruction = AELoss(recon)
        self.beta = beta

    def forward(self, outputs: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.reconstruction(outputs, images)
        mu, log_var = outputs["mu"], outputs["log_var"]
        kl = -0.5 * (1 + log_var - mu.square() - log_var.exp()).flatten(1).sum(1).mean() / images[0].numel()
        return {**parts, "loss": parts["loss"] + self.beta * kl, "kl": kl}


@MODEL_REGISTRY.register("vae")
class VanillaVAE(nn.Module):
    """Bergmann-style encoder to μ and log σ² (d each), sampled latent, mirrored decoder."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, latent_dim: int = 100, image_size: int = 256,
                 loss: str = "l2+ssim", beta: float = 1.0, map_kind: str = "l2", sigma: float = 4.0) -> None:
        super().__init__()
        self.encoder = ConvEncoder(in_channels, base_channels, 2 * latent_dim, image_size)
        self.decoder = ConvDecoder(latent_dim, base_channels, in_channels, image_size)
        self.criterion = VAELoss(loss, beta)
        self.map_kind, self.sigma = map_kind, sigma

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, log_var = self.encoder(images).chunk(2, dim=1)
        latent = reparameterize(mu, log_var, self.training)
        return {"reconstruction": self.decoder(latent), "mu": mu, "log_var": log_var}


@MODEL_REGISTRY.register("unet_vae")
class UNetVAE(nn.Module):
    """U-Net whose deepest map passes through μ / log σ² 1×1 heads and a sampled latent.

    Caveat: the skips bypass the bottleneck, so the KL term constrains only part of the information
    flow and the β trade-off weakens; skips can also copy defects to the output (REFERENCE §2.6).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 32, depth: int = 4, loss: str = "l2+ssim",
                 beta: float = 1.0, map_kind: str = "l2", sigma: float = 4.0) -> None:
        super().__init__()
        self.body = UNetBody(in_channels, base_channels, depth)
        channels = self.body.bottleneck_channels
        self.heads = nn.Conv2d(channels, 2 * channels, 1)
        self.criterion = VAELoss(loss, beta)
        self.map_kind, self.sigma = map_kind, sigma

    def _bottleneck(self, features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mu, log_var = self.heads(features).chunk(2, dim=1)
        return reparameterize(mu, log_var, self.training), {"mu": mu, "log_var": log_var}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction, extra = self.body(images, self._bottleneck)
        return {"reconstruction": reconstruction, **extra}
