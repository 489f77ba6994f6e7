"""Maps and masks of a split that may differ in size from image to image.

At ``data.image_size=native`` each image keeps its own size, so its maps and masks cannot be stacked
into one [N, 1, H, W] tensor: they are lists of [1, H, W]. These helpers take either form, so the
evaluation code has one path for both.
"""
from __future__ import annotations

import numpy as np
import torch


def joined(parts: list) -> torch.Tensor | list:
    """Batches' tensors concatenated; lists (native maps and masks, one per image) chained."""
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [value for part in parts for value in part]


def flat(values: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
    """Every pixel of maps or masks [N, 1, S, S] (or a list of [1, H, W]), image by image, as one array."""
    if isinstance(values, torch.Tensor):
        return values.flatten().numpy()
    return torch.cat([value.flatten() for value in values]).numpy()


def map_maxima(maps: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Each map's maximum [N]."""
    if isinstance(maps, torch.Tensor):
        return maps.amax(dim=(1, 2, 3))
    return torch.stack([heat.amax() for heat in maps])


def value_range(maps: torch.Tensor | list[torch.Tensor]) -> tuple[float, float]:
    """The smallest and largest value over every map."""
    if isinstance(maps, torch.Tensor):
        return float(maps.min()), float(maps.max())
    return min(float(heat.min()) for heat in maps), max(float(heat.max()) for heat in maps)
