"""Inputs shared by the end-to-end parity fixtures (tools/parity/make_end_to_end_fixtures.py) and their
tests: fixed images and seeded weights, generated the same way on both sides so that no image or weight
tensor has to be stored in the repository.

Both generators are version-stable: numpy's PCG64 stream and a torch.Generator seeded per tensor name.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parity_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` RGB uint8 images [N, size, size, 3]: a smooth random background (coarse noise upsampled
    by pixel repetition) plus fine noise, and in every odd image a bright square (an "anomaly")."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 200, (count, size // 8 + 1, size // 8 + 1, 3))
    images = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
    images = images + rng.integers(-20, 21, images.shape)
    for index in range(1, count, 2):
        top, left = (int(v) for v in rng.integers(size // 8, size // 2, 2))
        images[index, top:top + size // 4, left:left + size // 4] = 250
    return np.clip(images, 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1] (ToTensor), ImageNet-normalised if asked
    (torchvision's Normalize: subtract the mean, then divide by the std, in float32)."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        tensor = tensor.sub(mean).div(std)
    return tensor


def seeded_state(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """``seeded_tensors`` for every tensor of ``module``'s state dict."""
    return seeded_tensors(module.state_dict(), seed)


def seeded_tensors(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every named tensor, drawn per tensor name (so a truncated
    copy of the architecture gets the same values for the names it has): convolution / linear weights
    He-scaled, batch- and layer-norm affine parameters and running statistics away from their identity values (so
    that train and eval mode give different outputs), biases small,
    flow blocks' global scales about their identity value. Only names and shapes are read."""
    state = {}
    for name, tensor in tensors.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if not tensor.is_floating_point():
            state[name] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            value = 0.5 + noise.abs()
        elif name.endswith("running_mean"):
            value = 0.2 * noise
        elif name.endswith("global_scale"):  # a flow block's scale, about FrEIA's identity init (1.0)
            value = 2 * math.log(math.exp(5.0) - 1.0) + 0.3 * noise
        elif tensor.dim() >= 2 and not name.startswith("norms."):  # LayerNorms [C, H, W]: scales below
            value = noise * (2.0 / tensor[0].numel()) ** 0.5
        elif name.endswith("weight"):  # batch / layer norm scale
            value = 1.0 + 0.2 * noise
        else:
            value = 0.05 * noise
        state[name] = value.to(tensor.dtype)
    return state


def seeded_flow_tensors(tensors: dict[str, torch.Tensor], seed: int = 0, global_scale: float = 0.7,
                        subnet_gain: float = 0.1) -> dict[str, torch.Tensor]:
    """``seeded_tensors`` for FrEIA ``AllInOneBlock`` states (CFlow's decoders), tamed so that 8 blocks on
    seeded-backbone features (std 4–20) give log-likelihoods a few units apart rather than 1e9: the soft
    permutations ``*.w_perm`` orthogonal as FrEIA draws them (the Q factor of the seeded matrix's float64
    QR; ``*.w_perm_inv`` their transposes), the SOFTPLUS global scales about ``global_scale`` (not 1), the
    subnets' weights and biases times ``subnet_gain``."""
    state = seeded_tensors(tensors, seed)
    shift = 2 * (math.log(math.exp(5.0 * global_scale) - 1.0) - math.log(math.exp(5.0) - 1.0))
    for name, value in state.items():
        if name.endswith(("w_perm", "w_perm_inv")):
            matrix = seeded_tensors({name.removesuffix("_inv"): value}, seed)[name.removesuffix("_inv")]
            q = torch.linalg.qr(matrix.reshape(len(matrix), -1).double()).Q
            state[name] = (q.T if name.endswith("_inv") else q).reshape(value.shape).to(value.dtype)
        elif name.endswith("global_scale"):
            state[name] = value + shift
        elif ".subnet." in name:
            state[name] = value * subnet_gain
    return state
