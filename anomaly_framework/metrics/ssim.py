"""SSIM and PSNR, usable both as metrics and (SSIM) as a differentiable loss.

Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
Similarity", IEEE TIP 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03. The data range is always
explicit: guessing it from the tensor (as DRAEM's code does) silently changes the constants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.ops.filters import gaussian_kernel1d


def _window(channels: int, size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    kernel = gaussian_kernel1d(sigma, truncate=(size // 2) / sigma).to(like)
    return (kernel[:, None] * kernel[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, padding: str = "reflect") -> torch.Tensor:
    """Per-pixel SSIM [B, C, H, W] of images [B, C, H, W]; padding (``reflect``, or ``zeros`` as DRAEM's
    official loss) keeps the input size."""
    channels = x.shape[1]
    window = _window(channels, window_size, sigma, x)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        if padding == "zeros":
            return F.conv2d(t, window, padding=pad, groups=channels)
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, reduction: str = "mean",
         padding: str = "reflect") -> torch.Tensor:
    """Mean SSIM: one value (``mean``) or one per image (``none``)."""
    per_image = ssim_map(x, y, data_range, padding=padding).mean(dim=(1, 2, 3))
    return per_image.mean() if reduction == "mean" else per_image


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per image [B] in dB: 10·log10(range² / MSE)."""
    mse = (x - y).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


class SSIMLoss(nn.Module):
    """1 − mean SSIM, for training reconstructions (DRAEM, AE-SSIM)."""

    def __init__(self, data_range: float) -> None:
        super().__init__()
        self.data_range = data_range

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1 - ssim(prediction, target, self.data_range)
