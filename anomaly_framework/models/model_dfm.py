"""DFM: PCA of an image's pooled deep features; the score is their reconstruction error or Gaussian NLL.

Ahuja, Ndiour, Kalyanpur, Tickoo, "Probabilistic Modeling of Deep Features for Out-of-Distribution and
Adversarial Detection", NeurIPS 2019 workshop (arXiv 1909.11786). Reference implementation compared
against: anomalib's DFM (``anomalib.models.image.dfm``, anomalib 2.7.0).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.execution.distributed import gather_rows
from anomaly_framework.errors import FrameworkError
from anomaly_framework.models.model_base import FittedBuffersMixin, FrozenExtractorMixin
from anomaly_framework.registry import MODEL_REGISTRY

SCORE_TYPES = ("fre", "nll")


def fit_pca(rows: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and principal directions [D, k] of ``rows`` [N, D] (SVD in float64, as the reference).

    ``level`` ≤ 1 keeps k = the index of the first cumulative explained-variance ratio reaching it, the
    reference's rule (one component fewer than the smallest set that explains ``level``: with 0.97, the
    kept ones explain just under 97 %); ``level`` > 1 keeps ``int(level)`` components.
    """
    mean = rows.mean(dim=0)
    _, singular, right = torch.linalg.svd((rows - mean).double(), full_matrices=False)
    if level <= 1:
        variance = singular.square()
        ratios = variance.cumsum(dim=0) / variance.sum()
        count = int(torch.nonzero(ratios >= level)[0])
    else:
        count = int(level)
    return mean, right[:count].T.float()


@MODEL_REGISTRY.register("dfm")
class DFMModel(FrozenExtractorMixin, FittedBuffersMixin, nn.Module):
    """One vector per image (a layer's features average-pooled, flattened), a PCA of the training vectors,
    and either the feature reconstruction error (``fre``) or the negative log-likelihood of a Gaussian on
    the PCA coefficients (``nll``).

    Args:
        backbone: timm architecture (reference default ``resnet50``, timm's default weights).
        layers: the one feature level used (reference: ``layer3`` = index 3).
        pretrained: ImageNet weights for the backbone.
        weights: explicit weights file.
        pooling_kernel_size: average pooling (kernel = stride) of the feature map; 1 = none (reference: 4).
        pca_level: explained-variance level (≤ 1) or number of components (> 1) (reference: 0.97).
        score_type: ``fre`` or ``nll`` (reference default: ``fre``).
    """

    def __init__(self, backbone: str = "resnet50", layers: Sequence[int | str] = (3,), pretrained: bool = True,
                 weights: str | None = None, pooling_kernel_size: int = 4, pca_level: float = 0.97,
                 score_type: str = "fre") -> None:
        super().__init__()
        if len(layers) != 1:
            raise FrameworkError(f"DFM models one feature level: model.layers must hold one layer, got {list(layers)}")
        if score_type not in SCORE_TYPES:
            raise FrameworkError(f"model.score_type must be one of {', '.join(SCORE_TYPES)}, got {score_type!r}")
        if pooling_kernel_size < 1 or pca_level <= 0:
            raise FrameworkError(f"model.pooling_kernel_size must be ≥ 1 and model.pca_level > 0, got "
                                 f"{pooling_kernel_size} and {pca_level}")
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.pooling_kernel_size, self.pca_level, self.score_type = pooling_kernel_size, pca_level, score_type
        # Below the pooling kernel the pooled map is empty: refused by check_image_size before any work.
        self.size_minimum = self.extractor.reductions[0] * pooling_kernel_size
        self.register_buffer("pca_mean", torch.empty(0))
        self.register_buffer("pca_components", torch.empty(0))
        self.register_buffer("gaussian_mean", torch.empty(0))
        self.register_buffer("gaussian_directions", torch.empty(0))
        self.register_buffer("gaussian_scales", torch.empty(0))
        self._rows: list[torch.Tensor] = []
        self._fit_rows: torch.Tensor | None = None  # the fit's vectors, for leave_one_out (not saved)

    def pooled(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The average-pooled map [B, C, h/k, w/k] of images or of the features ``extract`` gave for them."""
        features = (self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs)[0].float()
        if self.pooling_kernel_size > 1:
            features = F.avg_pool2d(features, kernel_size=self.pooling_kernel_size)
        return features

    def begin_fit(self, num_images: int) -> None:
        self._rows = []

    @torch.no_grad()
    def update(self, inputs: torch.Tensor | list[torch.Tensor]) -> None:
        """Keeps a batch's image vectors [B, C·h·w] (the PCA needs them all at once)."""
        self._rows.append(self.pooled(inputs).flatten(1))

    def merge_across_ranks(self) -> None:
        """Every rank's vectors, in rank order (the single-process order), on every rank."""
        self._rows = [gather_rows(torch.cat(self._rows))]

    @torch.no_grad()
    def finalize(self) -> None:
        """Fits the PCA (and, for ``nll``, the Gaussian of the coefficients) in one pass over the vectors."""
        if not self._rows:
            raise FrameworkError("DFM has no training features: the train split is empty")
        rows = torch.cat(self._rows)
        if rows.shape[0] < 2:
            raise FrameworkError(f"DFM needs at least 2 training images for its PCA, got {rows.shape[0]}")
        self._fit(rows)
        self._fit_rows, self._rows = rows, []

    def _fit(self, rows: torch.Tensor) -> None:
        self.pca_mean, self.pca_components = fit_pca(rows, self.pca_level)
        if self.score_type == "nll":
            coefficients = (rows - self.pca_mean) @ self.pca_components  # [N, k]
            mean = coefficients.mean(dim=0)
            # The covariance as U·diag(s²)·Uᵀ of the centred coefficients over √N, as the reference.
            scaled = (coefficients - mean).T / rows.shape[0] ** 0.5
            directions, scales, _ = torch.linalg.svd(scaled, full_matrices=False)
            self.gaussian_mean, self.gaussian_directions, self.gaussian_scales = mean, directions, scales

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image scores [B] and the reconstruction-error map on the pooled grid [B, 1, h, w]."""
        if self.pca_components.numel() == 0:
            raise FrameworkError("DFM is not fitted: run the memory trainer (or load a checkpoint) first")
        pooled = self.pooled(inputs)
        centred = pooled.flatten(1) - self.pca_mean
        coefficients = centred @ self.pca_components
        error = (centred - coefficients @ self.pca_components.T).square()
        patch_scores = error.reshape(pooled.shape).sum(dim=1, keepdim=True)
        if self.score_type == "fre":
            scores = error.sum(dim=1)
        else:
            whitened = (coefficients - self.gaussian_mean) @ (self.gaussian_directions / self.gaussian_scales)
            scores = whitened.square().sum(dim=1) + 2 * self.gaussian_scales.log().sum()
        return {"image_scores": scores, "patch_scores": patch_scores}

    @torch.no_grad()
    def leave_one_out(self, inputs: torch.Tensor | list[torch.Tensor],
                      indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores of the fit's own images (``indices`` = their positions in the fit), each by a PCA (and
        Gaussian) refitted without it: one SVD of the other N−1 vectors per image."""
        if self._fit_rows is None or self._fit_rows.shape[0] < 3:
            raise FrameworkError("DFM's leave-one-out scores need the fit's own images (at least 3) in this process")
        fitted = {name: getattr(self, name) for name, _ in self.named_buffers(recurse=False)}
        parts = []
        try:
            for row, index in enumerate(indices.tolist()):
                keep = torch.ones(self._fit_rows.shape[0], dtype=torch.bool, device=self._fit_rows.device)
                keep[index] = False
                self._fit(self._fit_rows[keep])
                one = [level[row:row + 1] for level in inputs] if isinstance(inputs, list) else inputs[row:row + 1]
                parts.append(self.forward(one))
        finally:
            for name, value in fitted.items():
                setattr(self, name, value)
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
