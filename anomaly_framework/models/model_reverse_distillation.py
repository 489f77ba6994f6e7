"""Reverse Distillation: a decoder trained to rebuild a frozen encoder's features from a one-class code.

Deng, Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022 (arXiv
2201.10703). Official code: hq-deng/RD4AD (main.loss_fucntion, test.cal_anomaly_map / evaluation).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.backbones.weights import arch_name
from anomaly_framework.errors import FrameworkError
from anomaly_framework.models.reverse_distillation_blocks import OneClassBottleneck, ReverseDecoder, official_init
from anomaly_framework.registry import MODEL_REGISTRY

# Per encoder: residual block kind, bottleneck width per group, blocks of the OCBE's embedding stage,
# blocks of the decoder stages rebuilding levels 3, 2, 1. The ResNets as the official ``resnet.py`` /
# ``de_resnet.py`` pair them; EfficientNet-Lite0 is our adaptation (docs/models.md): its stage depths
# mirrored (5 blocks at stride 32 for the embedding, 6 / 2 / 2 between the levels), with ResNet-18's
# basic blocks.
ARCHITECTURES = {
    "resnet18": ("basic", 64, 2, (2, 2, 2)),
    "resnet34": ("basic", 64, 3, (3, 4, 6)),
    "resnet50": ("bottleneck", 64, 3, (3, 4, 6)),
    "wide_resnet50_2": ("bottleneck", 128, 3, (3, 4, 6)),
    "efficientnet_lite0": ("basic", 64, 5, (6, 2, 2)),
}


@MODEL_REGISTRY.register("reverse_distillation")
class ReverseDistillationModel(nn.Module):
    """Frozen pretrained encoder (teacher), trainable OCBE and reverse decoder (student).

    Args:
        backbone: timm architecture of the encoder (official: ``wide_resnet50_2``; also ``resnet18``,
            ``resnet34``, ``resnet50``; ``efficientnet_lite0`` is our adaptation).
        layers: three encoder levels, each of half the previous one's resolution (official: layer1–3).
        pretrained: ImageNet weights for the encoder (the OCBE and decoder always start at random).
        weights: explicit weights file for the encoder.
        sigma: Gaussian smoothing of the summed map (official: 4).
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[int | str] = (1, 2, 3),
                 pretrained: bool = True, weights: str | None = None, sigma: float = 4.0) -> None:
        super().__init__()
        arch = arch_name(backbone)
        if arch not in ARCHITECTURES:
            raise FrameworkError(f"Reverse Distillation has a decoder for {', '.join(ARCHITECTURES)}, "
                                 f"not model.backbone={backbone!r}")
        self.encoder = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        reductions = self.encoder.reductions
        if len(reductions) != 3 or reductions[1] != 2 * reductions[0] or reductions[2] != 2 * reductions[1]:
            raise FrameworkError(f"model.layers must be three levels of strides r, 2r, 4r for the OCBE, got "
                                 f"{list(layers)} (strides {reductions})")
        kind, width_per_group, embedding_blocks, decoder_blocks = ARCHITECTURES[arch]
        self.bottleneck = OneClassBottleneck(self.encoder.channels, kind, embedding_blocks, width_per_group)
        self.decoder = ReverseDecoder(self.bottleneck.out_channels, self.encoder.channels, kind, decoder_blocks,
                                      width_per_group)
        official_init(self.bottleneck)
        official_init(self.decoder)
        self.sigma = sigma
        # The code's grid must divide by 2: inputs whose deepest level has an odd side cannot be rebuilt.
        self.size_multiple = 2 * reductions[2]
        self.size_reason = "Reverse Distillation's stride-2 one-class embedding"

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Encoder features and their reconstructions, one [B, C_i, h_i, w_i] per level (shallowest first)."""
        with torch.no_grad():
            encoder = self.encoder(images)
        return {"encoder": encoder, "decoder": self.decoder(self.bottleneck(encoder))}

    @staticmethod
    def loss(outputs: dict) -> torch.Tensor:
        """Official loss: per level 1 − cosine similarity of each image's whole flattened feature map
        (C·h·w values), averaged over the batch, summed over levels."""
        return sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean()
                   for e, d in zip(outputs["encoder"], outputs["decoder"]))

    @staticmethod
    def level_maps(outputs: dict) -> list[torch.Tensor]:
        """Per level 1 − cosine similarity over channels at each position [B, 1, h_i, w_i]."""
        return [(1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1)
                for e, d in zip(outputs["encoder"], outputs["decoder"])]

    def anomaly_map(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """Sum over levels of the maps resized to ``size`` [B, 1, H, W], before smoothing.

        The official ``cal_anomaly_map`` resizes bilinearly with ``align_corners=True`` (not the
        half-pixel convention of the other models' reference code), so this does too.
        """
        return sum(F.interpolate(level, size=tuple(size), mode="bilinear", align_corners=True)
                   for level in self.level_maps(outputs))
