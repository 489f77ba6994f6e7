"""LPIPS perceptual distance, AlexNet trunk with the v0.1 linear heads.

Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", CVPR 2018; the numbers match ``lpips.LPIPS(net='alex')`` of richzhang/PerceptualSimilarity.
Inputs are RGB images in **[-1, 1]** (``to_lpips_range`` maps [0, 1] there); lower is more similar.

Two weight files are needed, looked up in the order of ``backbones/weights.py``:

* trunk, a torchvision AlexNet ImageNet state dict (``features.N.weight``; a full ``alexnet()`` state
  dict is fine): 1. ``trunk_weights=``, 2. ``weights/alexnet.pth`` (``.pt``, ``.safetensors``,
  ``.bin``), 3. torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` (torch hub cache, else a download,
  tried only when download.pytorch.org answers);
* heads, the lpips package's ``weights/v0.1/alex.pth`` (``lin0.model.1.weight`` ... ``lin4``):
  1. ``head_weights=``, 2. ``weights/lpips_alex_v0.1.pth``, 3. the file inside an installed ``lpips``
  package. torchvision has no hub copy of the heads.

No number is ever computed from random weights: without both files ``load_lpips`` returns ``None`` and
the reason.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torchvision
from torch import nn

from anomaly_framework.backbones.weights import WEIGHT_SUFFIXES, hub_reachable, load_state_dict_file, weights_dir
from anomaly_framework.errors import FrameworkError

TRUNK_STEM = "alexnet"
HEAD_STEM = "lpips_alex_v0.1"
CHANNELS = (64, 192, 384, 256, 256)
_TAPS = (1, 4, 7, 9, 11)  # the five ReLUs of torchvision's alexnet().features
_HUB_HOST = "download.pytorch.org"


def to_lpips_range(images: torch.Tensor) -> torch.Tensor:
    """Maps images in [0, 1] to the [-1, 1] range LPIPS was trained on."""
    return images * 2 - 1


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # vector_norm, unlike sqrt(sum x²), has a finite gradient where a whole feature vector is 0 after ReLU.
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + eps)


def _trunk_layers(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  origin: str) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of a torchvision AlexNet state dict, without the prefix, shape-checked."""
    layers = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    wrong = [key for key in expected
             if not isinstance(layers.get(key), torch.Tensor) or layers[key].shape != expected[key].shape]
    if wrong:
        raise FrameworkError(
            f"LPIPS trunk weights '{origin}' are not a torchvision AlexNet state dict: 'features.{wrong[0]}' is "
            f"missing or has the wrong shape (expected {tuple(expected[wrong[0]].shape)})"
        )
    return {key: layers[key] for key in expected}


def _head_weights(state: dict[str, torch.Tensor], origin: str) -> list[torch.Tensor]:
    """The five [1, C, 1, 1] linear-head weights of the lpips package's ``alex.pth``."""
    weights = []
    for index, channels in enumerate(CHANNELS):
        key = f"lin{index}.model.1.weight"
        value = state.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (1, channels, 1, 1):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing"
            raise FrameworkError(
                f"LPIPS head weights '{origin}': '{key}' should be [1, {channels}, 1, 1], found {found} "
                f"(expected the lpips package's weights/v0.1/alex.pth)"
            )
        weights.append(value)
    return weights


class LPIPS(nn.Module):
    """Frozen LPIPS (AlexNet, v0.1) built from already-loaded state dicts; see ``load_lpips`` for files.

    Args:
        trunk_state: torchvision AlexNet state dict (``features.N.weight`` / ``.bias``).
        head_state: lpips head state dict (``linK.model.1.weight``, [1, C_K, 1, 1]).
        origins: names of the two sources, used in error messages.
    """

    def __init__(self, trunk_state: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor],
                 origins: tuple[str, str] = ("trunk_state", "head_state")) -> None:
        super().__init__()
        # Built on the meta device: every tensor is replaced by the loaded weights, so random init is wasted
        # (mostly on the unused classifier). The final max-pool comes after the last tap and is dropped.
        with torch.device("meta"):
            trunk = torchvision.models.alexnet().features[: _TAPS[-1] + 1]
        self.trunk = trunk.to_empty(device="cpu")
        self.trunk.load_state_dict(_trunk_layers(trunk_state, self.trunk.state_dict(), origins[0]))
        self.heads = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in CHANNELS)
        for head, weight in zip(self.heads, _head_weights(head_state, origins[1])):
            head.weight.data.copy_(weight)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: the metric must not change with the mode of the model it is attached to."""
        return super().train(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs [B, C_i, h_i, w_i] for images [B, 3, H, W] in [-1, 1]."""
        taps, x = [], (images - self.shift) / self.scale
        for index, layer in enumerate(self.trunk):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance [B] between images [B, 3, H, W] in [-1, 1] (H, W ≥ 32); differentiable in x, y."""
        distance = x.new_zeros(x.shape[0])
        for head, fx, fy in zip(self.heads, self.features(x), self.features(y)):
            distance = distance + head((_unit_normalize(fx) - _unit_normalize(fy)).square()).mean(dim=(1, 2, 3))
        return distance


def _local_file(explicit: str | Path | None, stem: str) -> Path | None:
    """An explicit file (which must exist), else ``<weights folder>/<stem>.<suffix>``, else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FrameworkError(f"LPIPS weights file '{path}' not found")
        return path
    for suffix in WEIGHT_SUFFIXES:
        if (weights_dir() / f"{stem}{suffix}").is_file():
            return weights_dir() / f"{stem}{suffix}"
    return None


def _package_head_file() -> Path | None:
    """``weights/v0.1/alex.pth`` of an installed ``lpips`` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    return path if path.is_file() else None


def _hub_trunk() -> dict[str, torch.Tensor] | None:
    """torchvision's AlexNet ImageNet weights from the torch hub cache or, when reachable, a download."""
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    if not cached.is_file() and not hub_reachable(_HUB_HOST):
        return None
    try:
        return weights.get_state_dict(progress=False)
    except Exception:  # a failed download means "unavailable", reported by the caller
        return None


def load_lpips(trunk_weights: str | Path | None = None, head_weights: str | Path | None = None,
               device: str | torch.device = "cpu") -> tuple[LPIPS | None, str]:
    """Resolves both weight files (module docstring) and builds LPIPS on ``device``.

    Returns ``(model, where the weights came from)`` or ``(None, one-line reason naming the files to place)``.
    Unreadable or malformed files raise ``FrameworkError`` naming the file.
    """
    head_file = _local_file(head_weights, HEAD_STEM) or _package_head_file()
    trunk_file = _local_file(trunk_weights, TRUNK_STEM)
    trunk_state, trunk_origin = None, "torchvision AlexNet_Weights.IMAGENET1K_V1"
    if trunk_file is not None:
        trunk_state, trunk_origin = load_state_dict_file(trunk_file), str(trunk_file)
    elif head_file is not None:  # downloading the trunk is pointless without heads
        trunk_state = _hub_trunk()
    missing = []
    if trunk_state is None:
        missing.append(f"AlexNet trunk: place a torchvision alexnet state dict at '{weights_dir() / 'alexnet.pth'}'"
                       f" (or let torchvision download it from {_HUB_HOST})")
    if head_file is None:
        missing.append(f"v0.1 heads: place the lpips package's weights/v0.1/alex.pth at "
                       f"'{weights_dir() / (HEAD_STEM + '.pth')}' (no hub copy exists)")
    if missing:
        return None, "LPIPS unavailable, weights missing: " + "; ".join(missing)
    model = LPIPS(trunk_state, load_state_dict_file(head_file), origins=(trunk_origin, str(head_file)))
    return model.to(device), f"LPIPS trunk from {trunk_origin}, heads from {head_file}"
