"""DRAEM: a reconstructive network and a discriminative U-Net trained on simulated anomalies.

Zavrtanik, Kristan, Skočaj, "DRAEM – A discriminatively trained reconstruction embedding for surface
anomaly detection", ICCV 2021; layer widths, initialisation, loss and scoring follow the official code
(VitjanZ/DRAEM). Inputs are images in [0, 1] without ImageNet normalisation (pitfall P2): the simulated
textures live in [0, 1] too.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from anomaly_framework.metrics.ssim import ssim
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.errors import FrameworkError


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def double_conv(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """The official block: (3×3 conv, BN, ReLU) twice."""
    return nn.Sequential(*conv_bn_relu(c_in, c_mid), *conv_bn_relu(c_mid, c_out))


def up_conv(c_in: int, c_out: int) -> nn.Sequential:
    """×2 bilinear upsampling (align_corners, as the official code) then conv-BN-ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(c_in, c_out))


@contextlib.contextmanager
def frozen_running_statistics(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Batch norm still normalises with the batch's statistics, but its running mean, variance and count
    stay as they are (momentum 0: running · 1 + batch · 0 is the running value, bit for bit)."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def run_segment(modules: Iterable[nn.Module], function: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                recompute: bool = False) -> torch.Tensor:
    """``function(*inputs)`` (the forward of ``modules``); with ``recompute`` and gradients on, its
    activations are not kept but recomputed during the backward pass (exact gradients, a second forward
    of the segment). The recomputation must not update batch norm's running statistics a second time."""
    if not (recompute and torch.is_grad_enabled()):
        return function(*inputs)
    calls = []

    def once(*args: torch.Tensor) -> torch.Tensor:
        if calls:
            with frozen_running_statistics(modules):
                return function(*args)
        calls.append(True)
        return function(*args)

    return checkpoint(once, *inputs, use_reentrant=False)


class ConvEncoder(nn.Module):
    """Double-conv blocks of the given widths with a 2×2 max-pool before every block but the first."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.blocks = nn.ModuleList(double_conv(c_in, c_out, c_out) for c_in, c_out in zip(channels, widths))
        self.recompute = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, block in enumerate(self.blocks):
            pooled = (lambda t, block=block: block(F.max_pool2d(t, 2))) if index else block
            x = run_segment([block], pooled, x, recompute=self.recompute)
            features.append(x)
        return features


class ReconstructiveNetwork(nn.Module):
    """Encoder–decoder **without** skips (base 128; 8·base channels at 1/16 of the input), linear output."""

    def __init__(self, channels: int = 3, base: int = 128) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, [base, 2 * base, 4 * base, 8 * base, 8 * base])
        stages = [(8 * base, 4 * base), (4 * base, 2 * base), (2 * base, base), (base, base)]
        self.decoder = nn.Sequential(*(nn.Sequential(up_conv(c_in, c_in), double_conv(c_in, c_in, c_out))
                                       for c_in, c_out in stages))
        self.head = nn.Conv2d(base, channels, 3, padding=1)
        self.recompute = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(images)[-1]
        for stage in self.decoder:
            x = run_segment([stage], stage, x, recompute=self.recompute)
        return self.head(x)


class DiscriminativeNetwork(nn.Module):
    """U-Net **with** skips (base 64, six encoder blocks, 8·base channels at 1/32) to 2-channel logits."""

    def __init__(self, in_channels: int = 6, base: int = 64, out_channels: int = 2) -> None:
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base, 8 * base]
        self.encoder = ConvEncoder(in_channels, widths)
        outputs = [8 * base, 4 * base, 2 * base, base, base]
        skips = widths[-2::-1]  # b5, b4, b3, b2, b1
        previous = [widths[-1], *outputs[:-1]]
        self.ups = nn.ModuleList(up_conv(c_prev, c_out) for c_prev, c_out in zip(previous, outputs))
        self.merges = nn.ModuleList(double_conv(c_out + c_skip, c_out, c_out) for c_out, c_skip in zip(outputs, skips))
        self.head = nn.Conv2d(base, out_channels, 3, padding=1)
        self.recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *skips, x = self.encoder(x)
        for up, merge, skip in zip(self.ups, self.merges, reversed(skips)):
            x = run_segment([up, merge], lambda t, s, up=up, merge=merge: merge(torch.cat([up(t), s], dim=1)),
                            x, skip, recompute=self.recompute)
        return self.head(x)


def official_init(module: nn.Module) -> None:
    """The official ``weights_init``: conv weights N(0, 0.02); BN weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official focal loss on **softmax probabilities** [B, 2, H, W] against a binary mask [B, 1, H, W].

    As the code: one-hot targets clamped to [smooth, 1 − smooth], p_t = Σ target·p + smooth, α = 1,
    loss = mean of −(1 − p_t)^γ · log p_t.
    """
    one_hot = torch.cat([1 - target, target], dim=1).clamp(smooth, 1.0 - smooth)
    p_t = (one_hot * probabilities).sum(dim=1) + smooth
    return (-(1 - p_t).pow(gamma) * p_t.log()).mean()


@MODEL_REGISTRY.register("draem")
class DraemModel(nn.Module):
    """Reconstruct the (possibly corrupted) image, then segment anomalies from [reconstruction, image].

    Args:
        reconstructive_width: base width of the reconstructive network (128).
        discriminative_width: base width of the discriminative U-Net (64).
        focal_gamma: γ of the focal loss (2).
        score_filter: side of the mean filter applied to the map before its maximum (21).
        recompute_activations: keep only each block's input during training and recompute the rest in
            the backward pass: the same gradients and statistics with about a third of the activation
            memory (at 256 px, batch 8, about 8.6 GB of activations), for a second forward pass.
        image_size: input side; the U-Net's five poolings need a multiple of 32.
    """

    def __init__(self, reconstructive_width: int = 128, discriminative_width: int = 64, focal_gamma: float = 2.0,
                 score_filter: int = 21, recompute_activations: bool = False, image_size: int = 256) -> None:
        super().__init__()
        if image_size % 32:
            raise FrameworkError(f"DRAEM needs data.image_size divisible by 32 (five poolings), got {image_size}")
        if score_filter % 2 == 0:
            raise FrameworkError(f"model.score_filter must be odd, got {score_filter}")
        self.reconstructive = ReconstructiveNetwork(3, reconstructive_width)
        self.discriminative = DiscriminativeNetwork(6, discriminative_width, 2)
        self.apply(official_init)
        self.focal_gamma, self.score_filter = focal_gamma, score_filter
        self.set_recompute(recompute_activations)

    def set_recompute(self, enabled: bool) -> None:
        """Whether training recomputes activations in the backward pass instead of keeping them."""
        for network in (self.reconstructive, self.reconstructive.encoder, self.discriminative, self.discriminative.encoder):
            network.recompute = enabled

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction [B, 3, H, W] and segmentation logits [B, 2, H, W]."""
        reconstruction = self.reconstructive(images)
        logits = self.discriminative(torch.cat([reconstruction, images], dim=1))
        return {"reconstruction": reconstruction, "logits": logits}

    def loss(self, outputs: dict, clean_images: torch.Tensor, anomaly_masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """L2 + (1 − SSIM) of the reconstruction against the clean image, + focal loss of the segmentation.

        The SSIM windows zero-pad the border, as the official ``loss.SSIM`` (data range 1 for [0, 1] images)."""
        reconstruction = outputs["reconstruction"].float()
        l2 = F.mse_loss(reconstruction, clean_images)
        ssim_loss = 1.0 - ssim(reconstruction, clean_images, data_range=1.0, padding="zeros")  # as loss.SSIM
        focal = focal_loss(outputs["logits"].float().softmax(dim=1), anomaly_masks, self.focal_gamma)
        return {"loss": l2 + ssim_loss + focal, "l2": l2, "ssim_loss": ssim_loss, "focal": focal}

    @staticmethod
    def anomaly_map(outputs: dict) -> torch.Tensor:
        """The anomaly channel of the softmax [B, 1, H, W]."""
        return outputs["logits"].float().softmax(dim=1)[:, 1:]

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        """Maximum of the map after a ``score_filter``² mean filter (stride 1, same size)."""
        pad = self.score_filter // 2
        return F.avg_pool2d(maps, self.score_filter, stride=1, padding=pad, count_include_pad=True).amax(dim=(1, 2, 3))
