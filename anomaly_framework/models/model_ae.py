"""Convolutional autoencoders for anomaly detection by reconstruction: vanilla and UNet.

Bergmann, Löwe, Fauser, Sattlegger, Steger, "Improving Unsupervised Defect Segmentation by Applying
Structural Similarity to Autoencoders", VISAPP 2019 (the vanilla architecture); Ronneberger, Fischer,
Brox, "U-Net", MICCAI 2015 (the skip-connected variant). Inputs and outputs are images in [0, 1]
(``data.normalize = none``, sigmoid output), so SSIM uses a data range of 1.
"""
from __future__ import annotations

import torch
from torch import nn

from anomaly_framework.metrics.ssim import SSIMLoss
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.errors import FrameworkError


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1),
                         nn.LeakyReLU(0.2, inplace=True))


def _deconv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, padding=1), nn.LeakyReLU(0.2, inplace=True))


class ConvEncoder(nn.Module):
    """Bergmann's encoder: 4×4 stride-2 convs alternating with 3×3 ones, then a valid conv to a vector.

    ``out_channels`` is the latent size (twice it for a VAE's μ and log σ²) [B, out, 1, 1].
    """

    def __init__(self, in_channels: int, base: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size % 16:
            raise FrameworkError(f"The autoencoders need data.image_size divisible by 16, got {image_size}")
        self.layers = nn.Sequential(
            _conv(in_channels, base, 4, 2), _conv(base, base, 4, 2), _conv(base, base, 3, 1),
            _conv(base, 2 * base, 4, 2), _conv(2 * base, 2 * base, 3, 1), _conv(2 * base, 4 * base, 4, 2),
            _conv(4 * base, 2 * base, 3, 1), _conv(2 * base, base, 3, 1),
            nn.Conv2d(base, out_channels, image_size // 16),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class ConvDecoder(nn.Module):
    """The encoder mirrored with transposed convolutions; sigmoid output in [0, 1]."""

    def __init__(self, latent_dim: int, base: int, out_channels: int, image_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, base, image_size // 16), nn.LeakyReLU(0.2, inplace=True),
            _conv(base, 2 * base, 3, 1), _conv(2 * base, 4 * base, 3, 1), _deconv(4 * base, 2 * base),
            _conv(2 * base, 2 * base, 3, 1), _deconv(2 * base, base), _conv(base, base, 3, 1),
            _deconv(base, base), _deconv(base, base), nn.Conv2d(base, out_channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent)


@MODEL_REGISTRY.register("ae")
class VanillaAE(nn.Module):
    """Image → latent vector (d = 100) → image; the anomaly map is the reconstruction error."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, latent_dim: int = 100, image_size: int = 256,
                 loss: str = "l2+ssim", map_kind: str = "l2", sigma: float = 4.0) -> None:
        super().__init__()
        self.encoder = ConvEncoder(in_channels, base_channels, latent_dim, image_size)
        self.decoder = ConvDecoder(latent_dim, base_channels, in_channels, image_size)
        self.criterion = AELoss(loss)
        self.map_kind, self.sigma = map_kind, sigma

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"reconstruction": self.decoder(self.encoder(images))}


class DoubleConv(nn.Sequential):
    """Two 3×3 conv + BN + ReLU, the U-Net block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNetBody(nn.Module):
    """Encoder–decoder with skip connections; ``bottleneck`` may transform the deepest map (VAE heads)."""

    def __init__(self, in_channels: int, base: int, depth: int) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(in_channels, widths[0])] +
                                  [DoubleConv(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Sequential(nn.Conv2d(widths[0], in_channels, 1), nn.Sigmoid())
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_channels = widths[-1]
        self.size_multiple = 2**depth  # each pooling halves the map and the decoder doubles it back exactly

    def forward(self, images: torch.Tensor, bottleneck=None) -> tuple[torch.Tensor, dict]:
        skips, x = [], images
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        extra = {}
        if bottleneck is not None:
            x, extra = bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x), extra


@MODEL_REGISTRY.register("unet_ae")
class UNetAE(nn.Module):
    """U-Net autoencoder.

    Caveat: the skip connections let the network copy its input, defects included, straight to the
    output, which flattens the residual map (REFERENCE §2.6); use it as a baseline, not a detector
    of choice.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 32, depth: int = 4, loss: str = "l2+ssim",
                 map_kind: str = "l2", sigma: float = 4.0) -> None:
        super().__init__()
        self.body = UNetBody(in_channels, base_channels, depth)
        self.criterion = AELoss(loss)
        self.map_kind, self.sigma = map_kind, sigma

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"reconstruction": self.body(images)[0]}


class AELoss(nn.Module):
    """Reconstruction loss: ``l2`` (MSE), ``ssim`` (1 − SSIM) or ``l2+ssim`` (their sum), images in [0, 1]."""

    def __init__(self, kind: str = "l2+ssim") -> None:
        super().__init__()
        if kind not in ("l2", "ssim", "l2+ssim"):
            raise FrameworkError(f"model.loss must be l2, ssim or l2+ssim, got {kind!r}")
        self.kind = kind
        self.ssim = SSIMLoss(data_range=1.0)

    def forward(self, outputs: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction = outputs["reconstruction"]
        parts = {}
        if "l2" in self.kind:
            parts["l2"] = (reconstruction - images).square().mean()
        if "ssim" in self.kind:
            parts["ssim"] = self.ssim(reconstruction, images)
        return {"loss": sum(parts.values()), **parts}
