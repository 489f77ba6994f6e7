"""Locally aware patch features of PatchCore's official code, shared by PatchCore and SimpleNet.

Each position's p×p neighbourhood per layer is adaptive-average-pooled to ``pre_embed_dim``, deeper
layers are resized to the first layer's grid, and the stacked layers are pooled again to ``embed_dim``
(SimpleNet's official code reuses PatchCore's ``PatchMaker``, ``Preprocessing`` and ``Aggregator``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anomaly_framework.models.model_base import FrozenExtractorMixin


def _pool_matrix(inputs: int, outputs: int) -> torch.Tensor:
    """[inputs, outputs] matrix M with x @ M == adaptive_avg_pool1d(x, outputs)."""
    return F.adaptive_avg_pool1d(torch.eye(inputs).unsqueeze(1), outputs).squeeze(1)


class PatchAggregationMixin(FrozenExtractorMixin):
    """For an ``nn.Module`` with ``extractor`` (a ``TimmFeatureExtractor``), ``patch_size``,
    ``pre_embed_dim`` and ``embed_dim``; ``init_aggregation`` is called once those are set."""

    def init_aggregation(self) -> None:
        """Chooses the fused convolution or the pooling path and registers the fused weights."""
        # The fused convolution costs embed_dim·C·p² per position: worth it only for narrow layers.
        self.fused = all(c * self.patch_size**2 <= 2 * self.pre_embed_dim for c in self.extractor.channels)
        if self.fused:
            for index, weight in enumerate(self._projection_weights()):
                self.register_buffer(f"aggregation_{index}", weight, persistent=False)
        self.export_mode = False  # see prepare_export
        self._pool_matrices: dict[tuple[int, int], torch.Tensor] = {}

    def _projection_weights(self) -> list[torch.Tensor]:
        """Per-layer conv weights [embed_dim, C, p, p] equal to the official aggregation.

        The official code unfolds each position's p×p neighbourhood (C·p² values, channel-major),
        adaptive-average-pools them to ``pre_embed_dim``, stacks the layers and pools again to
        ``embed_dim``. Every step is linear, so the chain is one fixed matrix per layer; applied as a
        convolution it gives the same features without materialising the unfolded patches.
        """
        channels = self.extractor.channels
        stacked = _pool_matrix(len(channels) * self.pre_embed_dim, self.embed_dim)
        weights = []
        for index, channel in enumerate(channels):
            per_layer = _pool_matrix(channel * self.patch_size**2, self.pre_embed_dim)
            rows = stacked[index * self.pre_embed_dim:(index + 1) * self.pre_embed_dim]
            combined = per_layer @ rows  # [C·p², embed_dim]
            weights.append(combined.T.reshape(self.embed_dim, channel, self.patch_size, self.patch_size).contiguous())
        return weights

    @property
    def aggregation_weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"aggregation_{i}") for i in range(len(self.extractor.channels))]

    def embed(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features [B, h, w, embed_dim] on the first layer's grid, from images
        [B, 3, H, W] or the per-layer features ``extract`` gave for them.

        Deeper layers are bilinearly resized to that grid after the (linear) aggregation, which equals
        the official resize-then-pool order. Narrow backbones use the fused convolution; wide ones
        (C·p² well above ``pre_embed_dim``, e.g. WR50) pool the unfolded patches, which costs fewer
        operations there.
        """
        features = self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs
        if not self.fused:
            return self._embed_by_pooling(features)
        grid = features[0].shape[-2:]
        embedding = None
        for feature, weight in zip(features, self.aggregation_weights):
            layer = F.conv2d(feature, weight, padding=self.patch_size // 2)
            if layer.shape[-2:] != grid:
                layer = F.interpolate(layer, size=grid, mode="bilinear", align_corners=False)
            embedding = layer if embedding is None else embedding.add_(layer)
        return embedding.permute(0, 2, 3, 1)

    def _embed_by_pooling(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The official steps: unfold, adaptive-average-pool per layer, resize, stack, pool again."""
        grid = features[0].shape[-2:]
        pooled = []
        for feature in features:
            batch, channels, height, width = feature.shape
            patches = F.unfold(feature, kernel_size=self.patch_size, padding=self.patch_size // 2)
            patches = patches.transpose(1, 2).reshape(-1, 1, channels * self.patch_size**2)
            layer = self._pool(patches, self.pre_embed_dim).reshape(batch, height, width, -1)
            if (height, width) != tuple(grid):
                layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
                layer = layer.permute(0, 2, 3, 1)
            pooled.append(layer)
        stacked = torch.stack(pooled, dim=3).reshape(-1, 1, len(pooled) * self.pre_embed_dim)
        return self._pool(stacked, self.embed_dim).reshape(*pooled[0].shape[:3], self.embed_dim)

    def _pool(self, rows: torch.Tensor, size: int) -> torch.Tensor:
        """Adaptive average pooling of [N, 1, L] rows to ``size``; exported graphs multiply by its matrix."""
        if self.export_mode:
            return rows @ self._pool_matrices[(int(rows.shape[-1]), size)].to(rows)
        return F.adaptive_avg_pool1d(rows, size)

    def prepare_export(self) -> None:
        """Switches to graph-friendly equivalents so that a traced graph keeps a dynamic batch: pooling as a
        product with its (precomputed) matrix, and ``export_mode`` for the model's own steps (PatchCore's
        search chunked over the constant bank only). Same values up to float rounding."""
        self.export_mode = True
        widths = [(c * self.patch_size**2, self.pre_embed_dim) for c in self.extractor.channels]
        widths.append((len(self.extractor.channels) * self.pre_embed_dim, self.embed_dim))
        self._pool_matrices = {pair: _pool_matrix(*pair) for pair in widths}
