"""CFlow-AD: conditional normalizing flows on the fibers of frozen encoder features.

Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via
Conditional Normalizing Flows", WACV 2022 (official code: gudovskiy/cflow-ad). Each feature vector
("fiber") of each pooled encoder level is an independent sample whose log-likelihood one flow per level
estimates, conditioned on a 2-D sinusoidal encoding of its position.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import InterpolationMode, rotate

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.backbones.weights import arch_name
from anomaly_framework.errors import FrameworkError
from anomaly_framework.ops.normalize import IMAGENET_MEAN, IMAGENET_STD
from anomaly_framework.models.flow_components import AllInOneCoupling, SequentialFlow
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.models.model_base import FrozenExtractorMixin

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """[channels, height, width]: the first half encodes the column, the second the row, each as
    interleaved sin/cos at frequencies 10000^(-2k/(channels/2)) (the official ``positionalencoding2d``)."""
    if channels % 4:
        raise FrameworkError(f"Config key 'model.condition_dim' must be a multiple of 4, got {channels}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    columns = torch.arange(0.0, width)[:, None] * frequencies  # [W, half/2]
    rows = torch.arange(0.0, height)[:, None] * frequencies  # [H, half/2]
    encoding = torch.zeros(channels, height, width)
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding


def conditional_flow(channels: int, coupling_blocks: int, clamp: float, condition_dim: int, level: int = 0) -> SequentialFlow:
    """The official ``freia_cflow_head``: AllInOneBlocks with a 2-layer subnet of hidden width twice its
    input ([x₁, condition]), a soft permutation and the SOFTPLUS global affine."""
    return SequentialFlow([AllInOneCoupling(channels, 1, 2.0, clamp, seed=1000 * level + step,
                                            condition_channels=condition_dim, soft_permutation=True)
                           for step in range(coupling_blocks)])


def use_reflect_padding(module: nn.Module) -> None:
    """The official encoder (custom_models/resnet.py) pads every ResNet convolution wider than 1×1 by
    reflection instead of zeros (its torchvision weights are loaded unchanged)."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and max(conv.kernel_size) > 1:
            conv.padding_mode = "reflect"


@MODEL_REGISTRY.register("cflow")
class CflowModel(FrozenExtractorMixin, nn.Module):
    """One conditional flow per encoder level, on fibers [C] conditioned on their position [P].

    Args:
        backbone: timm CNN (official default wide_resnet50_2; resnet18 also official).
        layers: encoder levels (official pool layers 3: layer2, layer3, layer4 = timm indices 2, 3, 4).
        pretrained, weights: backbone weights.
        coupling_blocks: flow steps per level (8).
        clamp: soft clamp α of the coupling log-scales (1.9).
        condition_dim: size P of the positional encoding (128).
        fiber_batch: fibers per optimiser step N (256).
        rotation_degrees: training images rotated by a uniform angle in ±this (official 5, nearest
            neighbour, black fill); 0 = none, and the training features are then cached once.
        reflect_padding: None = the official rule, reflection padding for ResNets (its custom encoder).
    """

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[int | str] = (2, 3, 4),
                 pretrained: bool = True, weights: str | None = None, coupling_blocks: int = 8, clamp: float = 1.9,
                 condition_dim: int = 128, fiber_batch: int = 256, rotation_degrees: float = 5.0,
                 reflect_padding: bool | None = None) -> None:
        super().__init__()
        positional_encoding_2d(condition_dim, 1, 1)  # refuses a size the encoding cannot take
        self.condition_dim, self.fiber_batch, self.rotation_degrees = condition_dim, fiber_batch, rotation_degrees
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        if reflect_padding if reflect_padding is not None else arch_name(backbone).startswith(("resnet", "wide_resnet")):
            use_reflect_padding(self.extractor)
        self.flows = nn.ModuleList([conditional_flow(channels, coupling_blocks, clamp, condition_dim, level)
                                    for level, channels in enumerate(self.extractor.channels)])
        # Per level, the highest log-likelihood of the last training epoch's fibers: the test-time
        # normalisation constant (the official code takes the maximum over the whole test set).
        self.register_buffer("log_prob_max", torch.zeros(len(self.flows)))

    @property
    def augments_training(self) -> bool:
        """Training images change every epoch, so their features cannot be cached."""
        return self.rotation_degrees > 0

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Each ImageNet-normalised image rotated by its own uniform angle in ±``rotation_degrees``, as
        torchvision's RandomRotation on the official code's resized images (nearest, filled black)."""
        fill = [float(-mean / std) for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)]
        angles = torch.empty(images.shape[0]).uniform_(-self.rotation_degrees, self.rotation_degrees)
        return torch.stack([rotate(image, float(angle), InterpolationMode.NEAREST, fill=fill)
                            for image, angle in zip(images, angles)])

    def conditions(self, feature: torch.Tensor) -> torch.Tensor:
        """The positional encoding of a level's feature map, [B, P, H, W]."""
        encoding = positional_encoding_2d(self.condition_dim, feature.shape[2], feature.shape[3])
        return encoding.to(feature)[None].expand(feature.shape[0], -1, -1, -1)

    def level_log_prob(self, level: int, feature: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Log-likelihood per dimension, (−C·log√(2π) − ½‖z‖² + log|det J|) / C, of every position of
        ``feature`` [B, C, H, W] → [B, H, W] (fibers [N, C] → [N])."""
        z, log_det = self.flows[level](feature, condition, per_position=True)
        channels = feature.shape[1]
        return (-channels * LOG_SQRT_2PI - 0.5 * z.square().sum(dim=1) + log_det) / channels

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per-level log-likelihood maps [B, h_i, w_i] of images [B, 3, H, W] or of their features."""
        features = self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs
        return {"log_prob": [self.level_log_prob(level, feature, self.conditions(feature))
                             for level, feature in enumerate(features)]}

    @staticmethod
    def fiber_loss(log_prob: torch.Tensor) -> torch.Tensor:
        """The official loss per fiber: −log σ(log-likelihood per dimension)."""
        return -F.logsigmoid(log_prob)

    def anomaly_map(self, outputs: dict, size: Sequence[int], level_max: Sequence[torch.Tensor] | None = None,
                    shift: float | torch.Tensor | None = None) -> torch.Tensor:
        """shift − Σ_levels upsample(exp(log p − max_level log p)) [B, 1, H, W] (bilinear, corners aligned).

        The official code subtracts each level's maximum over the whole test set and then takes the map
        from the maximum of the summed map over that set; given the batch's own (``level_max`` /
        ``shift`` None) this is that computation on one batch. Runs use the fitted ``log_prob_max`` and a
        shift equal to the number of levels (the largest value the sum can take on fitted-normal fibers),
        so each image's map is independent of the others.
        """
        if level_max is None:
            level_max = [log_prob.amax() for log_prob in outputs["log_prob"]]
        total = sum(F.interpolate(torch.exp(log_prob - maximum)[:, None], size=tuple(size), mode="bilinear",
                                  align_corners=True)
                    for log_prob, maximum in zip(outputs["log_prob"], level_max))
        return (total.amax() if shift is None else shift) - total
