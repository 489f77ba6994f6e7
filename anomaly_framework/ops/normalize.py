"""The ImageNet input statistics that datasets normalise with, and the way back to [0, 1] RGB."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: torch.Tensor, normalize: str) -> torch.Tensor:
    """Back to [0, 1] RGB from the dataloader's normalisation ("imagenet" or "none")."""
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        images = images * std + mean
    return images.clamp(0, 1)
