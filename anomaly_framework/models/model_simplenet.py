"""SimpleNet: a feature adaptor and a discriminator told apart from Gaussian-noised features.

Liu, Zhou, Xu, Wang, "SimpleNet: A Simple Network for Image Anomaly Detection and Localization",
CVPR 2023 (arXiv 2303.15140). Official code: DonaldRR/SimpleNet (read at 351a2b8).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.models.patch_aggregation import PatchAggregationMixin
from anomaly_framework.ops.filters import gaussian_blur2d, upsample_maps
from anomaly_framework.registry import MODEL_REGISTRY


def xavier_linear(module: nn.Module) -> None:
    """The official ``init_weight``: Xavier-normal weights of linear and conv layers, default biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)


def truncated_l1(normal: torch.Tensor, anomalous: torch.Tensor, margin: float) -> torch.Tensor:
    """SimpleNet's loss on discriminator outputs, normal ones pushed above ``margin``, anomalous ones below
    −``margin``: mean(max(0, margin − normal)) + mean(max(0, margin + anomalous)); an empty side adds 0."""
    parts = [torch.clamp(margin - normal, min=0), torch.clamp(margin + anomalous, min=0)]
    return sum(part.mean() if part.numel() else part.sum() for part in parts)


def discriminator(width: int, layers: int, hidden: int) -> nn.Sequential:
    """(layers − 1) blocks Linear → BatchNorm1d → LeakyReLU(0.2), then a bias-free Linear to one score."""
    blocks: list[nn.Module] = []
    for index in range(layers - 1):
        blocks += [nn.Linear(width if index == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
    blocks.append(nn.Linear(hidden if layers > 1 else width, 1, bias=False))
    return nn.Sequential(*blocks)


@MODEL_REGISTRY.register("simplenet")
class SimpleNetModel(PatchAggregationMixin, nn.Module):
    """Frozen backbone → PatchCore's locally aware features → linear adaptor → per-patch discriminator.

    Training scores the adapted features of normal images and the same features plus N(0, σ²) noise;
    evaluation maps each patch to minus its discriminator score.

    Args:
        backbone: timm architecture (official: torchvision ``wide_resnet50_2``).
        layers: feature indices (official: layer2 + layer3 = indices 2, 3).
        pretrained, weights: backbone weights.
        patch_size: neighbourhood aggregated around each position (official: 3).
        pre_embed_dim, embed_dim: per-layer and final pooled widths (official: 1536, 1536).
        adaptor_layers: linear layers of the feature adaptor, no activation between them (official: 1).
        discriminator_layers, discriminator_hidden: official 2 and 1024.
        noise_std: σ of the feature-space noise (official: 0.015).
        margin: truncated-L1 margin th (official: 0.5).
        sigma: Gaussian smoothing of the upsampled map (official: 4).
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[int | str] = (2, 3),
                 pretrained: bool = True, weights: str | None = None, patch_size: int = 3,
                 pre_embed_dim: int = 1536, embed_dim: int = 1536, adaptor_layers: int = 1,
                 discriminator_layers: int = 2, discriminator_hidden: int = 1024, noise_std: float = 0.015,
                 margin: float = 0.5, sigma: float = 4.0) -> None:
        super().__init__()
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.patch_size, self.pre_embed_dim, self.embed_dim = patch_size, pre_embed_dim, embed_dim
        self.init_aggregation()
        self.noise_std, self.margin, self.sigma = noise_std, margin, sigma
        self.adaptor = nn.Sequential(*[nn.Linear(embed_dim, embed_dim) for _ in range(adaptor_layers)])
        self.discriminator = discriminator(embed_dim, discriminator_layers, discriminator_hidden)
        self.adaptor.apply(xavier_linear)
        self.discriminator.apply(xavier_linear)

    def adapted(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Adapted patch features [B, h, w, D] from images or cached backbone features."""
        return self.adaptor(self.embed(inputs))

    def forward(self, inputs: torch.Tensor | list[torch.Tensor], noise: torch.Tensor | None = None) -> dict:
        """Training: discriminator scores of the true and the noised patches ([B·h·w, 1] each), scored in
        one batch as the official code does (batch norm sees both). Evaluation: ``patch_scores`` =
        −score [B, 1, h, w]. ``noise`` replaces the random draw (parity tests)."""
        adapted = self.adapted(inputs)
        batch, height, width, dim = adapted.shape
        rows = adapted.reshape(-1, dim)
        if not self.training:
            return {"patch_scores": -self.discriminator(rows).reshape(batch, 1, height, width)}
        if noise is None:
            noise = torch.randn_like(rows) * self.noise_std
        scores = self.discriminator(torch.cat([rows, rows + noise.reshape(rows.shape)]))
        return {"true_scores": scores[:len(rows)], "fake_scores": scores[len(rows):]}

    def loss(self, outputs: dict) -> dict[str, torch.Tensor]:
        """Truncated L1 with margin th: true scores pushed above th, noised ones below −th."""
        return {"loss": truncated_l1(outputs["true_scores"], outputs["fake_scores"], self.margin)}

    def anomaly_map(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """Patch scores bilinearly upsampled to ``size`` then smoothed (σ 4, scipy's reflect border)."""
        return gaussian_blur2d(upsample_maps(outputs["patch_scores"], size), self.sigma)

    @staticmethod
    def image_score(outputs: dict) -> torch.Tensor:
        """The official image score: the largest patch score, before upsampling and smoothing [B]."""
        return outputs["patch_scores"].amax(dim=(1, 2, 3))
