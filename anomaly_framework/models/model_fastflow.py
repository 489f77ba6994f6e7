"""FastFlow: 2-D normalizing flows on frozen pretrained features.

Yu, Zheng, Wang, Li, Wu, Zhao, Wu, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows", arXiv 2111.07677 (no official code; gathierry/FastFlow is the de-facto reference).
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn

from anomaly_framework.models.flow_components import AllInOneCoupling, SequentialFlow
from anomaly_framework.backbones.extractors import TimmFeatureExtractor, ViTFeatureExtractor
from anomaly_framework.backbones.weights import arch_name
from anomaly_framework.ops.filters import upsample_maps
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.models.model_base import FrozenExtractorMixin

# Paper settings per backbone: (flow steps, hidden ratio, 3×3 convolutions only).
PAPER_FLOW_SETTINGS = {"resnet18": (8, 1.0, True), "wide_resnet50_2": (8, 1.0, False)}
VIT_FLOW_SETTINGS = (20, 0.16, False)
# Transformer backbones give one map, taken after this block (0-based): DeiT after 8 blocks, CaiT after 41.
PAPER_VIT_BLOCKS = {"deit_base_distilled_patch16_384": 7, "cait_m48_448": 40}


def is_vit(backbone: str) -> bool:
    """DeiT and CaiT backbones (timm), which FastFlow cuts after one block instead of using CNN stages."""
    return backbone.startswith(("deit", "cait", "vit"))


@MODEL_REGISTRY.register("fastflow")
class FastFlowModel(FrozenExtractorMixin, nn.Module):
    """One flow per CNN stage on LayerNorm-ed frozen features.

    Args:
        backbone: timm CNN (paper: resnet18, wide_resnet50_2). Other CNNs use the resnet18 settings.
        layers: stages (1, 2, 3 as the reference's out_indices); unused by transformer backbones.
        pretrained, weights: backbone weights.
        flow_steps, hidden_ratio, conv3x3_only: None = the paper's values for the backbone; without
            ``conv3x3_only`` steps alternate 3×3 (even) and 1×1 (odd) subnet kernels.
        clamp: soft clamp of the coupling log-scales (2.0).
        vit_block_index: block after which a DeiT/CaiT backbone is cut; None = the paper's (DeiT 7,
            CaiT 40) for those two, else the middle block. Transformers use 20 steps, ratio 0.16,
            alternating kernels, and their own final norm instead of the trainable LayerNorm.
        image_size: input side (sets the LayerNorm shapes).
    """

    def __init__(self, backbone: str = "resnet18", layers: Sequence[int | str] = (1, 2, 3), pretrained: bool = True,
                 weights: str | None = None, flow_steps: int | None = None, hidden_ratio: float | None = None,
                 conv3x3_only: bool | None = None, clamp: float = 2.0, vit_block_index: int | None = None,
                 image_size: int = 256) -> None:
        super().__init__()
        vit = is_vit(backbone)
        default = VIT_FLOW_SETTINGS if vit else PAPER_FLOW_SETTINGS["resnet18"]
        steps, ratio, only3x3 = PAPER_FLOW_SETTINGS.get(arch_name(backbone), default)
        steps = flow_steps if flow_steps is not None else steps
        ratio = hidden_ratio if hidden_ratio is not None else ratio
        only3x3 = conv3x3_only if conv3x3_only is not None else only3x3
        if vit:
            if vit_block_index is None:
                vit_block_index = PAPER_VIT_BLOCKS.get(arch_name(backbone), len(timm.create_model(backbone).blocks) // 2)
            self.extractor = ViTFeatureExtractor(backbone, vit_block_index, pretrained=pretrained, weights=weights)
        else:
            self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        with torch.no_grad():
            shapes = [f.shape[1:] for f in self.extractor(torch.zeros(1, 3, image_size, image_size))]
        # Not in the paper but needed for CNNs (gathierry #3): a trainable LayerNorm over [C, H, W] per
        # stage. Transformer features are already normalised by the backbone's own final norm.
        self.norms = nn.ModuleList([nn.Identity() if vit else nn.LayerNorm(list(shape), elementwise_affine=True)
                                    for shape in shapes])
        self.flows = nn.ModuleList([
            SequentialFlow([
                AllInOneCoupling(shape[0], 3 if only3x3 or step % 2 == 0 else 1, ratio, clamp, seed=1000 * stage + step)
                for step in range(steps)
            ])
            for stage, shape in enumerate(shapes)
        ])

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Latents z [B, C_i, h_i, w_i] and log-determinants [B] per stage, from images [B, 3, H, W]
        or from the per-stage features ``extract`` gave for them."""
        features = self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs
        latents, log_dets = [], []
        for feature, norm, flow in zip(features, self.norms, self.flows):
            z, log_det = flow(norm(feature))
            latents.append(z)
            log_dets.append(log_det)
        return {"z": latents, "log_det": log_dets}

    @staticmethod
    def loss(outputs: dict) -> torch.Tensor:
        """Σ over stages of the batch mean of 0.5·Σz² − log|det J| (the reference, no per-dim scaling)."""
        return sum((0.5 * z.square().sum(dim=(1, 2, 3)) - log_det).mean()
                   for z, log_det in zip(outputs["z"], outputs["log_det"]))

    @staticmethod
    def anomaly_map(outputs: dict, size: Sequence[int]) -> torch.Tensor:
        """The reference's map: per stage −exp(−½·mean_c z²), upsampled and averaged (log-det ignored, P5)."""
        maps = [upsample_maps(-torch.exp(-0.5 * z.square().mean(dim=1, keepdim=True)), size) for z in outputs["z"]]
        return torch.stack(maps).mean(dim=0)
