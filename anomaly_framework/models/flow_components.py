"""Normalizing-flow building blocks written for FastFlow: an all-in-one affine coupling block.

Equivalent to FrEIA's ``AllInOneBlock`` as FastFlow's reference implementation configures it
(Ardizzone et al., FrEIA; gathierry/FastFlow): affine coupling of one channel half conditioned on the
other through a conv subnet, soft clamping of the log-scale, a learned global affine transform, and a
fixed hard channel permutation. Every block returns its log-determinant and has an exact inverse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_subnet(in_channels: int, out_channels: int, kernel_size: int, hidden_ratio: float) -> nn.Sequential:
    """Conv(k) → ReLU → Conv(k) with "same" padding; hidden width = int(in_channels · ratio)."""
    hidden = int(in_channels * hidden_ratio)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding="same"), nn.ReLU(),
                         nn.Conv2d(hidden, out_channels, kernel_size, padding="same"))


class AllInOneCoupling(nn.Module):
    """One flow step on [B, C, H, W].

    Args:
        channels: C.
        kernel_size: subnet kernel (3 or 1).
        hidden_ratio: subnet hidden width relative to its input.
        clamp: soft clamp s ↦ clamp·tanh(s) of the log-scale (FastFlow: 2.0).
        seed: seeds the fixed permutation, so a model is rebuilt identically.
    """

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, clamp: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.split = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.subnet = conv_subnet(self.split[0], 2 * self.split[1], kernel_size, hidden_ratio)
        # FrEIA's SOFTPLUS global affine: scale = 0.1·softplus_β=0.5(g), initialised to exactly 1.
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        permutation = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = 0.1 * self.subnet(x1)  # FrEIA damps the subnet output by 0.1
        log_scale = self.clamp * torch.tanh(params[:, : self.split[1]])
        return log_scale, params[:, self.split[1]:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y and log|det ∂y/∂x| [B]."""
        x1, x2 = torch.split(x, self.split, dim=1)
        log_scale, shift = self._coupling(x1)
        y = torch.cat([x1, x2 * torch.exp(log_scale) + shift], dim=1)
        scale = self._scale()
        y = (y * scale + self.global_offset).index_select(1, self.permutation)
        pixels = x.shape[2] * x.shape[3]
        log_det = log_scale.sum(dim=(1, 2, 3)) + pixels * torch.log(scale).sum()
        return y, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The exact x of ``forward``'s y."""
        y = (y.index_select(1, self.inverse_permutation) - self.global_offset) / self._scale()
        x1, y2 = torch.split(y, self.split, dim=1)
        log_scale, shift = self._coupling(x1)
        return torch.cat([x1, (y2 - shift) * torch.exp(-log_scale)], dim=1)


class SequentialFlow(nn.Module):
    """Coupling blocks in sequence; log-determinants add up."""

    def __init__(self, blocks: list[AllInOneCoupling]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x, block_log_det = block(x)
            log_det = log_det + block_log_det
        return x, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y
