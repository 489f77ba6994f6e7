"""Normalizing-flow building blocks of FastFlow and CFlow-AD: an all-in-one affine coupling block.

Equivalent to FrEIA's ``AllInOneBlock`` as FastFlow's reference implementation configures it
(Ardizzone et al., FrEIA; gathierry/FastFlow): affine coupling of one channel half conditioned on the
other through a conv subnet, soft clamping of the log-scale, a learned global affine transform, and a
fixed hard channel permutation. Every block returns its log-determinant and has an exact inverse.
CFlow-AD (gudovskiy/cflow-ad) configures the same block with a condition (positional encoding)
concatenated to the subnet's input and a soft permutation (a fixed random rotation from SO(C)); its
fully connected subnet on fibers [N, C] is the 1×1-conv subnet on [N, C, 1, 1] (or on whole maps).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import special_ortho_group
from torch import nn


class PointwiseSubnet(nn.Sequential):
    """1×1 convolutions that also take fibers [N, C], as the linear layers they equal (CFlow's ``subnet_fc``;
    a linear layer is several times faster than a 1×1 convolution on [N, C, 1, 1] on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x)
        for layer in self:
            x = F.linear(x, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) else layer(x)
        return x


def conv_subnet(in_channels: int, out_channels: int, kernel_size: int, hidden_ratio: float) -> nn.Sequential:
    """Conv(k) → ReLU → Conv(k) with "same" padding; hidden width = int(in_channels · ratio)."""
    hidden = int(in_channels * hidden_ratio)
    layers = (nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
              nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))
    return PointwiseSubnet(*layers) if kernel_size == 1 else nn.Sequential(*layers)


def _per_channel(parameter: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [1, C, 1, 1] parameter shaped for x: maps [B, C, H, W] or fibers [N, C]."""
    return parameter if x.dim() == 4 else parameter.flatten(1)


class AllInOneCoupling(nn.Module):
    """One flow step on [B, C, H, W].

    Args:
        channels: C.
        kernel_size: subnet kernel (3 or 1).
        hidden_ratio: subnet hidden width relative to its input.
        clamp: soft clamp s ↦ clamp·tanh(s) of the log-scale (FastFlow: 2.0, CFlow: 1.9).
        seed: seeds the fixed permutation, so a model is rebuilt identically.
        condition_channels: channels of a condition [B, P, H, W] concatenated to the subnet's input.
        soft_permutation: a random rotation from SO(C) instead of a channel permutation (CFlow).
    """

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, clamp: float = 2.0, seed: int = 0,
                 condition_channels: int = 0, soft_permutation: bool = False) -> None:
        super().__init__()
        self.split = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.subnet = conv_subnet(self.split[0] + condition_channels, 2 * self.split[1], kernel_size, hidden_ratio)
        # FrEIA's SOFTPLUS global affine: scale = 0.1·softplus_β=0.5(g), initialised to exactly 1.
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.soft_permutation = soft_permutation
        if soft_permutation:
            rotation = special_ortho_group.rvs(channels, random_state=np.random.RandomState(seed)) if channels > 1 else np.ones((1, 1))
            self.register_buffer("rotation", torch.tensor(rotation, dtype=torch.float32).view(channels, channels, 1, 1))
        else:
            permutation = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
            self.register_buffer("permutation", permutation)
            self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = 0.1 * self.subnet(x1)  # FrEIA damps the subnet output by 0.1
        log_scale = self.clamp * torch.tanh(params[:, : self.split[1]])
        return log_scale, params[:, self.split[1]:]

    def _permute(self, y: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if self.soft_permutation:
            rotation = self.rotation.transpose(0, 1) if inverse else self.rotation
            return F.conv2d(y, rotation) if y.dim() == 4 else F.linear(y, rotation.flatten(1))
        return y.index_select(1, self.inverse_permutation if inverse else self.permutation)

    @staticmethod
    def _subnet_input(x1: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return x1 if condition is None else torch.cat([x1, condition], dim=1)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None,
                per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """y and log|det ∂y/∂x| [B] (or per position [B, H, W] when ``per_position``, for flows whose
        every position is an independent sample, as CFlow's fibers; fibers [N, C] with 1×1 subnets)."""
        x1, x2 = torch.split(x, self.split, dim=1)
        log_scale, shift = self._coupling(self._subnet_input(x1, condition))
        y = torch.cat([x1, x2 * torch.exp(log_scale) + shift], dim=1)
        scale = self._scale()
        y = self._permute(y * _per_channel(scale, y) + _per_channel(self.global_offset, y))
        if per_position:
            return y, log_scale.sum(dim=1) + torch.log(scale).sum()
        pixels = x.shape[2] * x.shape[3]
        log_det = log_scale.sum(dim=(1, 2, 3)) + pixels * torch.log(scale).sum()
        return y, log_det

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The exact x of ``forward``'s y."""
        y = (self._permute(y, inverse=True) - _per_channel(self.global_offset, y)) / _per_channel(self._scale(), y)
        x1, y2 = torch.split(y, self.split, dim=1)
        log_scale, shift = self._coupling(self._subnet_input(x1, condition))
        return torch.cat([x1, (y2 - shift) * torch.exp(-log_scale)], dim=1)


class SequentialFlow(nn.Module):
    """Coupling blocks in sequence; log-determinants add up."""

    def __init__(self, blocks: list[AllInOneCoupling]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None,
                per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[:1] + (x.shape[2:] if per_position else ()), device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x, block_log_det = block(x, condition, per_position)
            log_det = log_det + block_log_det
        return x, log_det

    def inverse(self, y: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y, condition)
        return y
