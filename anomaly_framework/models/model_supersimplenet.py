"""SuperSimpleNet (unsupervised mode): SimpleNet's successor with Perlin-masked feature noise, a
segmentation head and a classification head.

Rolih, Kristan, Skočaj, Fučka, "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for Fast
and Reliable Surface Defect Detection", ICPR 2024 (arXiv 2408.03143). Official code: blaz-r/SuperSimpleNet
(read at 60d1e74).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.dataloaders.anomaly_simulation import perlin_noise_2d
from anomaly_framework.models.model_simplenet import truncated_l1, xavier_linear
from anomaly_framework.ops.filters import gaussian_kernel1d, upsample_maps
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.models.model_base import FrozenExtractorMixin

PERLIN_SCALES = (0, 6)  # lattice cells 2^a per axis, a ∈ [0, 6), as the official generator


def focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """The official (DeSTSeg's) focal loss on probabilities, α off: mean of BCE·(1 − p_t)^γ."""
    targets = targets.float()
    bce = F.binary_cross_entropy(probabilities.float(), targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    return (bce * (1 - p_t) ** gamma).mean()


def torchvision_gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's ``GaussianBlur(2·ceil(3σ) + 1, σ)`` as the official map generator: 25 taps at σ 4,
    border ``reflect`` of ``torch.nn.functional.pad`` (edge sample not repeated: ``c b | a b c``)."""
    kernel = gaussian_kernel1d(sigma, truncate=math.ceil(3 * sigma) / sigma).to(maps)
    radius = kernel.numel() // 2
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    channels = int(maps.shape[1])
    padded = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def perlin_feature_mask(height: int, width: int, threshold: float, rng: np.random.Generator) -> torch.Tensor:
    """One binary mask [1, h, w] of the feature grid: Perlin noise on the next power-of-two grid at 2^a × 2^b
    cells, bilinearly resized to (h, w), above ``threshold``; empty with probability ½ (``no_anomaly`` =
    "empty" of the official unsupervised setting), so half the noised copies stay normal."""
    grid = (1 << (height - 1).bit_length(), 1 << (width - 1).bit_length())
    scales = tuple(int(2 ** rng.integers(*PERLIN_SCALES)) for _ in range(2))
    noise = torch.from_numpy(perlin_noise_2d(grid, scales, rng)).view(1, 1, *grid)
    noise = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    mask = (noise[0] > threshold).float()
    return mask * 0 if rng.random() > 0.5 else mask


@MODEL_REGISTRY.register("supersimplenet")
class SuperSimpleNetModel(FrozenExtractorMixin, nn.Module):
    """Frozen backbone → upscaled, 3×3-averaged features → 1×1 adaptor → segmentation and classification heads.

    Training doubles the batch and adds N(0, σ²) noise inside Perlin masks of the feature grid; the masks
    are the segmentation targets, and "any masked cell" the classification target.

    Args:
        backbone: timm architecture (official: torchvision ``wide_resnet50_2``).
        layers: feature indices (official: layer2 + layer3 = indices 2, 3).
        pretrained, weights: backbone weights.
        patch_size: average-pooling neighbourhood (official: 3).
        seg_hidden: width of the segmentation head's hidden 1×1 layer (official: 1024).
        cls_channels, cls_kernel: the classification head's convolution (official: 128, 5×5).
        noise_std: σ of the feature noise (official: 0.015).
        perlin_threshold: binarisation threshold of the Perlin noise (official MVTec: 0.2; VisA: 0.6).
        margin: truncated-L1 margin (official: 0.5).
        focal_gamma: γ of both focal losses (official: 4).
        stop_grad: the classification head sees the segmentation map detached (official unsupervised: true).
        sigma: Gaussian smoothing of the upsampled map (official: 4, torchvision's 25-tap kernel).
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[int | str] = (2, 3),
                 pretrained: bool = True, weights: str | None = None, patch_size: int = 3, seg_hidden: int = 1024,
                 cls_channels: int = 128, cls_kernel: int = 5, noise_std: float = 0.015,
                 perlin_threshold: float = 0.2, margin: float = 0.5, focal_gamma: float = 4.0,
                 stop_grad: bool = True, sigma: float = 4.0) -> None:
        super().__init__()
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.patch_size, self.noise_std, self.perlin_threshold = patch_size, noise_std, perlin_threshold
        self.margin, self.focal_gamma, self.stop_grad, self.sigma = margin, focal_gamma, stop_grad, sigma
        width = sum(self.extractor.channels)
        self.adaptor = nn.Conv2d(width, width, kernel_size=1)
        self.segmentation = nn.Sequential(nn.Conv2d(width, seg_hidden, 1), nn.BatchNorm2d(seg_hidden),
                                          nn.LeakyReLU(0.2), nn.Conv2d(seg_hidden, 1, 1, bias=False))
        self.classification = nn.Sequential(nn.Conv2d(width + 1, cls_channels, cls_kernel, padding=cls_kernel // 2),
                                            nn.BatchNorm2d(cls_channels), nn.ReLU())
        self.score = nn.Linear(2 * cls_channels + 2, 1)
        for part in (self.adaptor, self.segmentation, self.classification, self.score):
            part.apply(xavier_linear)

    def features(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Every layer resized to twice the first layer's grid (align_corners=True, as the official
        extractor), concatenated, then averaged over 3×3 neighbourhoods (zero padding counted) [B, C, 2h, 2w]."""
        layers = self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs
        grid = (2 * int(layers[0].shape[-2]), 2 * int(layers[0].shape[-1]))
        upscaled = torch.cat([F.interpolate(layer, size=grid, mode="bilinear", align_corners=True) for layer in layers], 1)
        return F.avg_pool2d(upscaled, self.patch_size, stride=1, padding=self.patch_size // 2)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation map [B, 1, h, w] (high = anomalous) and classification logit [B]."""
        seg = self.segmentation(features)
        seen = seg.detach() if self.stop_grad else seg
        conv = self.classification(torch.cat([features, seen], dim=1))
        pooled = torch.cat([conv.amax(dim=(2, 3)), conv.mean(dim=(2, 3)), seen.amax(dim=(2, 3)), seen.mean(dim=(2, 3))], 1)
        return seg, self.score(pooled).squeeze(1)

    def perlin_masks(self, count: int, height: int, width: int) -> torch.Tensor:
        """``count`` masks [count, 1, h, w] from DRAEM's Perlin generator, seeded from torch's generator so
        a run's seed (and a resumed run's RNG state) fixes them."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        return torch.stack([perlin_feature_mask(height, width, self.perlin_threshold, rng) for _ in range(count)])

    def forward(self, inputs: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> dict:
        """Evaluation: ``map`` [B, 1, h, w] and ``score`` [B]. Training: the same for the doubled, noised
        batch, with their targets ``mask`` [2B, 1, h, w] and ``label`` [2B]. ``masks`` and ``noise`` replace
        the random draws (parity tests)."""
        adapted = self.adaptor(self.features(inputs))
        if not self.training:
            seg, score = self.heads(adapted)
            return {"map": seg, "score": score}
        doubled = torch.cat([adapted, adapted])
        if masks is None:
            masks = self.perlin_masks(len(doubled), *doubled.shape[-2:]).to(doubled)
        if noise is None:
            noise = torch.randn_like(doubled) * self.noise_std
        seg, score = self.heads(doubled + noise * masks)
        return {"map": seg, "score": score, "mask": masks, "label": masks.flatten(1).amax(dim=1)}

    def loss(self, outputs: dict) -> dict[str, torch.Tensor]:
        """The official objective: truncated L1 on the map (normal cells below −th, masked ones above th)
        plus focal losses on the sigmoid of the map and of the classification logit."""
        seg, mask = outputs["map"], outputs["mask"]
        l1 = truncated_l1(-seg[mask == 0], -seg[mask > 0], self.margin)
        focal_map = focal_loss(torch.sigmoid(seg), mask, self.focal_gamma)
        focal_score = focal_loss(torch.sigmoid(outputs["score"]), outputs["label"], self.focal_gamma)
        return {"loss": l1 + focal_map + focal_score, "truncated_l1": l1, "focal_map": focal_map,
                "focal_score": focal_score}

    def anomaly_map(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """The segmentation map bilinearly upsampled to ``size``, then torchvision's Gaussian blur."""
        return torchvision_gaussian_blur(upsample_maps(outputs["map"], size), self.sigma)

    @staticmethod
    def image_score(outputs: dict) -> torch.Tensor:
        """The official image score: the sigmoid of the classification logit [B]."""
        return torch.sigmoid(outputs["score"])
