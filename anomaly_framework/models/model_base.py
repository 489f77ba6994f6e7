"""What several models share: input-size checks, buffers sized by fitting, and reconstruction-error maps."""
from __future__ import annotations

import torch
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor, ViTFeatureExtractor
from anomaly_framework.errors import FrameworkError
from anomaly_framework.metrics.ssim import ssim_map
from anomaly_framework.ops.filters import gaussian_blur2d


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
        least = getattr(module, "size_minimum", None)
        if least and image_size < least:
            raise FrameworkError(f"data.image_size={image_size} is too small for {type(module).__name__}'s pooled "
                                 f"grid: the minimum is {least}")
        multiple = getattr(module, "size_multiple", None)
        if multiple and image_size % multiple:
            reason = getattr(module, "size_reason", f"the U-Net's {multiple.bit_length() - 1} poolings")
            raise FrameworkError(f"data.image_size={image_size} does not suit {reason}: use a multiple of {multiple} "
                                 f"(the minimum is {multiple})")


def tileable(model: nn.Module) -> bool:
    """Whether tiles suit the model: its own ``tileable`` attribute, else whether it has a feature backbone
    (features are local, so a tile's map is the image's map there); a model joins by either."""
    flag = getattr(model, "tileable", None)
    if flag is not None:
        return bool(flag)
    return any(isinstance(module, (TimmFeatureExtractor, ViTFeatureExtractor)) for module in model.modules())


def check_tiling(model: nn.Module, data_cfg: dict) -> None:
    """Refuses ``data.tile_size`` for a model without a feature backbone, or a tile its grid cannot take."""
    tile = data_cfg.get("tile_size")
    if tile is None:
        return
    if not tileable(model):
        raise FrameworkError(f"data.tile_size={tile}: {type(model).__name__} has no feature backbone to tile "
                             f"(tiling suits PaDiM, PatchCore, STFPM, FastFlow...): unset data.tile_size")
    try:
        check_image_size(model, tile)
    except FrameworkError as error:
        raise FrameworkError(str(error).replace("data.image_size", "data.tile_size")) from None


class FrozenExtractorMixin:
    """Models with a frozen feature extractor (``self.extractor``): ``extract`` gives its per-layer features,
    which the memory and flow trainers compute once per image (feature cache) and tiling streams tile by tile;
    ``forward`` / ``embed`` accept them in place of images."""

    extractor: nn.Module

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's features per layer [B, C, h, w] each (no autograd record: nothing above
        the frozen extractor trains it)."""
        return self.extractor(images)


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
        error = 1 - ssim_map(reconstruction, images, data_range).mean(dim=1, keepdim=True)
    else:
        raise FrameworkError(f"model.map_kind must be 'l2' or 'ssim', got {kind!r}")
    return gaussian_blur2d(error, sigma)
