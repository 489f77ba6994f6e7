"""STFPM: a student network trained to match a frozen teacher's feature pyramid on normal images.

Wang, Han, Ding, Huang, "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021
(arXiv 2103.04257). Official code: gdwang08/STFPM.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor, reset_batchnorm

from anomaly_framework.ops.filters import upsample_maps
from anomaly_framework.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register("stfpm")
class STFPMModel(nn.Module):
    """Frozen pretrained teacher and a same-architecture student trained from random initialisation.

    The student starts as the official code's ``torchvision.models.resnet18(pretrained=False)``: Kaiming
    convolutions (timm's ResNet init is the same) and every batch-norm weight 1, where timm's
    ``zero_init_last`` would zero the last one of each residual block. It has only the stages up to the
    last matched level (the official student keeps ``layer4``, which the loss never reaches).

    Args:
        backbone: timm architecture of both networks (paper: ``resnet18``; a pretrained tag applies to the teacher).
        layers: pyramid levels matched (paper: layer1–3 = indices 1, 2, 3).
        pretrained: ImageNet weights for the teacher (the student is always random).
        weights: explicit weights file for the teacher.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        self.teacher = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.student = TimmFeatureExtractor(backbone, layers, pretrained=False, requires_grad=True)
        reset_batchnorm(self.student)

    def forward(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Teacher and student feature maps, one [B, C_i, h_i, w_i] per level."""
        with torch.no_grad():
            teacher = self.teacher(images)
        return {"teacher": teacher, "student": self.student(images)}

    @staticmethod
    def layer_distances(outputs: dict) -> list[torch.Tensor]:
        """Per level ‖t̂ − ŝ‖² over channels of the L2-normalised features [B, h_i, w_i]."""
        return [
            (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)
            for t, s in zip(outputs["teacher"], outputs["student"])
        ]

    def loss(self, outputs: dict) -> torch.Tensor:
        """Official loss: per level the mean over batch and positions of ‖t̂ − ŝ‖², summed over levels.

        The paper writes a ½ factor that the official code drops; so do we, as the code's learning
        rate (0.4) was tuned without it.
        """
        return sum(distance.mean() for distance in self.layer_distances(outputs))

    def grid_map(self, outputs: dict) -> torch.Tensor:
        """Product over levels of the distance maps on the finest level's grid [B, 1, h_1, w_1].

        As the official code: each level bilinearly resized to 64×64 (the layer1 grid of its 256-px input)
        and multiplied there. The official model selection averages this map over held-out normal images.
        """
        distances = [d.unsqueeze(1) for d in self.layer_distances(outputs)]
        grid = distances[0].shape[-2:]
        product = distances[0]
        for level in distances[1:]:
            product = product * upsample_maps(level, grid)
        return product

    def anomaly_map(self, outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """The grid map bilinearly resized to ``size`` [B, 1, H, W] (the official code's cv2 resize, which
        equals torch's half-pixel bilinear when enlarging)."""
        return upsample_maps(self.grid_map(outputs), size)
