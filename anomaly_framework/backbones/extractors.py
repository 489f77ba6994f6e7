"""Frozen feature extractors on timm backbones (CNN stages, ViT blocks), with the weights ``weights`` resolves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from anomaly_framework.backbones.runtimes import ExportedBackbone
from anomaly_framework.backbones.weights import (LITE_PACKAGE_MEAN, LITE_PACKAGE_STD, check_backbone, file_sha256,
                                                 resolve_backbone_state)
from anomaly_framework.errors import FrameworkError
from anomaly_framework.ops.normalize import IMAGENET_MEAN, IMAGENET_STD


class FrozenRuntimeMixin:
    """A frozen extractor's forward in the runtime ``model.backbone_runtime`` chose (``backbones.runtimes``);
    ``eager(images)`` is the PyTorch computation, used for everything but frozen eval-mode passes whose
    inputs need no gradient (and while a whole model is traced for export)."""

    exported: ExportedBackbone | None = None
    frozen = True

    def use_runtime(self, runtime: str, folder: Path) -> None:
        """Runs later frozen passes in ``runtime``, exports stored in ``folder`` (``torch``: eager)."""
        facts = (type(self).__name__, self.backbone_name, getattr(self, "layers", None), getattr(self, "block_index", None))
        self.exported = ExportedBackbone(self, runtime, folder, facts) if runtime != "torch" else None

    def runtime_name(self, device_type: str) -> str:
        """The concrete runtime of this extractor's frozen passes on ``device_type``."""
        return self.exported.concrete(device_type) if self.exported is not None else "torch"

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Returns one feature map [B, C_i, H/r_i, W/r_i] per requested layer."""
        runner = None
        if (self.exported is not None and self.frozen and not self.model.training and not images.requires_grad
                and not torch.jit.is_tracing()):
            runner = self.exported.runner(images)
        return runner(images) if runner is not None else self.eager(images)


def use_backbone_runtime(model: nn.Module, runtime: str, folder: Path) -> None:
    """Gives every frozen extractor inside ``model`` the runtime ``runtime`` (trained parts stay eager)."""
    for module in model.modules():
        if isinstance(module, FrozenRuntimeMixin) and module.frozen:
            module.use_runtime(runtime, folder)


class TimmFeatureExtractor(FrozenRuntimeMixin, nn.Module):
    """A frozen timm backbone returning intermediate feature maps, always in eval mode.

    Inputs are ImageNet-normalised [B, 3, H, W]; backbones whose weights expect other input statistics
    re-normalise internally, so every dataset uses one convention.

    Args:
        backbone: timm architecture name, e.g. ``wide_resnet50_2``.
        layers: timm feature indices (1 = stride 4 for ResNets) or module names (``layer2``).
        pretrained: load ImageNet weights (resolution order: ``backbones.weights``).
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
                mean, std, batchnorm_eps = LITE_PACKAGE_MEAN, LITE_PACKAGE_STD, 1e-3
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
        if module.exported is not None:
            module.exported.forget()

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

    def eager(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Returns one feature map [B, C_i, H/r_i, W/r_i] per requested layer, in PyTorch."""
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
            if self.exported is not None:
                self.exported.forget()


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


class ViTFeatureExtractor(FrozenRuntimeMixin, nn.Module):
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

    def eager(self, images: torch.Tensor) -> list[torch.Tensor]:
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
        return [tokens.transpose(1, 2).reshape(tokens.shape[0], -1, images.shape[-2] // self.patch, side)]


def weights_record(model: nn.Module) -> dict[str, str | None]:
    """Which backbone weights a model was built with (``hub:<arch>.<tag>``, or a file and its sha256), for
    results.json, the checkpoint and the console; models without a pretrained backbone say so."""
    extractor = next((m for m in model.modules() if hasattr(m, "weights_source")), None)
    if extractor is None:
        return {"weights_source": "trained from scratch", "weights_sha256": None}
    return {"weights_source": extractor.weights_source, "weights_sha256": extractor.weights_sha256}
