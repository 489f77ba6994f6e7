"""Gaussian smoothing and upsampling of anomaly maps, as the official code does them (scipy's default
``reflect`` border, ``align_corners=False``); the Gaussian kernel is SSIM's too."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The 1-D Gaussian used by scipy.ndimage.gaussian_filter (radius = int(truncate * sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of every padded position under scipy's default ``reflect`` mode (edge sample repeated:
    ``d c b a | a b c d | d c b a``), periodic with period 2·size so any radius is valid."""
    positions = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(positions < size, positions, 2 * size - 1 - positions)


def gaussian_blur2d(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, C, H, W] maps equal to scipy.ndimage.gaussian_filter's default
    (σ=4 → 33 taps, border mode ``reflect``), which the official PaDiM and PatchCore code call."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    channels, height, width = (int(size) for size in maps.shape[1:])  # constants: exporters need the kernel's shape
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    maps = F.conv2d(maps.index_select(3, _reflect_indices(width, radius, maps.device)), horizontal, groups=channels)
    return F.conv2d(maps.index_select(2, _reflect_indices(height, radius, maps.device)), vertical, groups=channels)


def upsample_maps(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resizes [B, 1, h, w] maps to the input resolution (align_corners=False, as the reference code)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=tuple(size), mode="nearest")
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)
