"""Reverse Distillation's trainable parts: the one-class bottleneck embedding (OCBE) and the reverse decoder.

Deng, Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022 (arXiv
2201.10703). Official code: hq-deng/RD4AD (``resnet.BN_layer``, ``de_resnet.ResNet``). The residual blocks
are ResNet's basic and bottleneck blocks; the decoder's replace the strided 3×3 convolution (and the
shortcut's strided 1×1) by a 2×2 transposed convolution of stride 2, as the official decoder does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Channel multiplier of a block's output over its ``planes`` (ResNet's ``expansion``).
EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _resampling_conv(in_channels: int, out_channels: int, stride: int, upsample: bool, kernel: int = 3) -> nn.Module:
    """The block's spatial convolution: strided ``kernel``×``kernel`` going down (encoder side), or a 2×2
    transposed convolution of stride 2 going up (decoder side, stride 2 only)."""
    if upsample and stride == 2:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
    if kernel == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
    return _conv3x3(in_channels, out_channels, stride)


class ResidualBlock(nn.Module):
    """ResNet's basic (two 3×3) or bottleneck (1×1, 3×3, 1×1) block, resampling by ``stride`` 2 when asked.

    Args:
        kind: ``basic`` or ``bottleneck``.
        in_channels: input channels.
        planes: output channels / ``EXPANSION[kind]``.
        stride: 2 halves (``upsample=False``) or doubles (``upsample=True``) the grid.
        width_per_group: bottleneck width = planes · width_per_group / 64 (128 for wide ResNets).
        upsample: decoder block (transposed convolutions) instead of an encoder-style one.
    """

    def __init__(self, kind: str, in_channels: int, planes: int, stride: int = 1, width_per_group: int = 64,
                 upsample: bool = False) -> None:
        super().__init__()
        self.kind = kind
        out_channels = planes * EXPANSION[kind]
        if kind == "basic":
            self.conv1 = _resampling_conv(in_channels, planes, stride, upsample)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = _conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            width = planes * width_per_group // 64
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = _resampling_conv(width, width, stride, upsample)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
            self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(_resampling_conv(in_channels, out_channels, stride, upsample, kernel=1),
                                          nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.kind == "bottleneck":
            out = self.bn3(self.conv3(self.relu(out)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


def _stage(kind: str, in_channels: int, out_channels: int, blocks: int, width_per_group: int,
           upsample: bool) -> nn.Sequential:
    """``blocks`` residual blocks, the first one resampling by 2 and changing the width."""
    planes = out_channels // EXPANSION[kind]
    layers = [ResidualBlock(kind, in_channels, planes, 2, width_per_group, upsample)]
    layers += [ResidualBlock(kind, out_channels, planes, 1, width_per_group, upsample) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [_conv3x3(in_channels, out_channels, 2), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion then one-class embedding (paper sec. 3.2, official ``BN_layer``).

    The two shallower levels [B, C1, 4h, 4w] and [B, C2, 2h, 2w] are brought to the deepest one's grid
    by strided 3×3 convolutions (C1 → C2 → C3 and C2 → C3, batch norm and ReLU after each), concatenated
    with it (3·C3 channels), and a stage of residual blocks (the first with stride 2) embeds them into a
    [B, 2·C3, h/2, w/2] code, the place of the encoder's last stage.
    """

    def __init__(self, channels: Sequence[int], kind: str, blocks: int, width_per_group: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.level1_down = nn.Sequential(*_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c3))
        self.level2_down = nn.Sequential(*_conv_bn_relu(c2, c3))
        self.embedding = _stage(kind, 3 * c3, 2 * c3, blocks, width_per_group, upsample=False)
        self.out_channels = 2 * c3

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat([self.level1_down(features[0]), self.level2_down(features[1]), features[2]], dim=1)
        return self.embedding(fused).contiguous()


class ReverseDecoder(nn.Module):
    """Stages of upsampling residual blocks from the OCBE code back to every encoder level (official
    ``de_resnet.ResNet``): outputs ordered as the encoder's features, shallowest first.

    ``blocks[i]`` is the number of blocks of the stage that rebuilds the i-th level counted from the
    deepest (the official code's ``layers[i]`` for its ``layer{i+1}``).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], kind: str, blocks: Sequence[int],
                 width_per_group: int) -> None:
        super().__init__()
        stages, previous = [], in_channels
        for target, count in zip(reversed(channels), blocks):
            stages.append(_stage(kind, previous, target, count, width_per_group, upsample=True))
            previous = target
        self.stages = nn.ModuleList(stages)

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            code = stage(code)
            outputs.append(code)
        return outputs[::-1]


def official_init(module: nn.Module) -> None:
    """As both official modules: Kaiming-normal (fan-out, ReLU) convolutions and unit batch norms. The
    transposed convolutions are not ``nn.Conv2d`` there and keep PyTorch's default initialisation."""
    for layer in module.modules():
        if type(layer) is nn.Conv2d:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
