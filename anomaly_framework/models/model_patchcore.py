"""PatchCore: a coreset-subsampled memory bank of locally aware patch features.

Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022 (arXiv 2106.08265). Official code: amazon-science/patchcore-inspection.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from anomaly_framework.execution.distributed import gather_rows
from anomaly_framework.execution.interrupts import raise_if_interrupted
from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.models.model_base import FittedBuffersMixin
from anomaly_framework.models.patch_aggregation import PatchAggregationMixin
from anomaly_framework.models.nearest_neighbors import bank_chunked_topk_nearest, chunked_nearest, chunked_topk_nearest
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.errors import FrameworkError

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@MODEL_REGISTRY.register("patchcore")
class PatchcoreModel(PatchAggregationMixin, FittedBuffersMixin, nn.Module):
    """Memory bank of neighbourhood-aggregated features; anomaly = distance to the nearest bank entry.

    Args:
        backbone: timm architecture (paper: ``wide_resnet50_2``).
        layers: feature indices (paper: layer2 + layer3 = indices 2, 3).
        pretrained, weights: backbone weights (see ``backbones.weights``).
        patch_size: neighbourhood aggregated around each position (official: 3).
        pre_embed_dim: per-layer dimension after 1-D adaptive average pooling (official: 1024).
        embed_dim: final dimension after pooling the stacked layers (official: 1024).
        coreset_ratio: fraction of patches kept by greedy k-center (0.1; 1.0 keeps all).
        projection_dim: random projection used only to select the coreset (official: 128).
        num_start_points: random anchors initialising the approximate greedy search (official: 10).
        coreset_seed: seed of the projection and the anchors.
        score_mode: ``reweighted`` (paper eq. 7, b neighbours) or ``max`` (official code: max patch score).
        num_neighbors: b of the re-weighting (paper: 9).
        sigma: Gaussian smoothing of the upsampled map (4).
        bank_dtype: ``float32`` or ``float16`` storage of the bank (search runs in float32 chunks).
        memory_budget_mb: refuse to fit when the bank plus working memory would exceed this.
        chunk_mb: bound on each chunk's working memory in the coreset and the search.
        official_batchnorm_pass: reproduce the official code's side effect before the first feature is
            extracted (``feature_dimensions()`` runs one all-ones image through the backbone in training
            mode, moving its batch-norm running statistics); off = the pretrained statistics, as intended.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        patch_size: int = 3,
        pre_embed_dim: int = 1024,
        embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_start_points: int = 10,
        coreset_seed: int = 0,
        score_mode: str = "reweighted",
        num_neighbors: int = 9,
        sigma: float = 4.0,
        bank_dtype: str = "float32",
        memory_budget_mb: float = 8192.0,
        chunk_mb: float = 64.0,
        official_batchnorm_pass: bool = False,
    ) -> None:
        super().__init__()
        if score_mode not in ("reweighted", "max"):
            raise FrameworkError(f"model.score_mode must be 'reweighted' or 'max', got {score_mode!r}")
        if bank_dtype not in _DTYPES:
            raise FrameworkError(f"model.bank_dtype must be one of {sorted(_DTYPES)}, got {bank_dtype!r}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise FrameworkError(f"model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        self.patch_size, self.pre_embed_dim, self.embed_dim = patch_size, pre_embed_dim, embed_dim
        self.coreset_ratio, self.projection_dim = coreset_ratio, projection_dim
        self.num_start_points, self.coreset_seed = num_start_points, coreset_seed
        self.score_mode, self.num_neighbors, self.sigma = score_mode, num_neighbors, sigma
        self.bank_dtype = _DTYPES[bank_dtype]
        self.memory_budget_mb, self.chunk_mb = memory_budget_mb, chunk_mb
        self.official_batchnorm_pass = official_batchnorm_pass
        self.register_buffer("memory_bank", torch.empty(0, embed_dim))
        # Source image of each bank row, for leave-one-image-out scores right after the fit (not saved).
        self.register_buffer("bank_source", torch.empty(0, dtype=torch.long), persistent=False)
        self.init_aggregation()
        self._features: torch.Tensor | None = None  # preallocated [N_patches, D] during fitting
        self._batchnorm_pass_done = False
        self._filled = 0
        self._expected_images = 0
        self._patches_per_image = 0
        self.coreset_stats: dict[str, int] = {}

    # -- fitting ----------------------------------------------------------------------------------
    def memory_estimate_mb(self, num_patches: int, query_patches: int = 0) -> dict[str, float]:
        """Bytes the fit will hold: collected features, the kept bank, and the coreset's working set."""
        item = torch.finfo(self.bank_dtype).bits // 8
        collected = num_patches * self.embed_dim * item
        kept = max(1, int(num_patches * self.coreset_ratio)) * self.embed_dim * item
        projected = num_patches * (self.projection_dim + 2) * 4 if self.coreset_ratio < 1.0 else 0
        working = 2 * self.chunk_mb * 2**20
        estimate = {"features": collected, "bank": kept, "coreset": projected, "chunks": working}
        estimate = {key: value / 2**20 for key, value in estimate.items()}
        estimate["total"] = sum(estimate.values())
        return estimate

    def begin_fit(self, num_images: int) -> None:
        """Records how many training images will come; the store is allocated at the first batch."""
        self._expected_images = num_images
        self._features, self._filled = None, 0
        self._batchnorm_pass_done = False

    def _allocate(self, patches_per_image: int, device: torch.device) -> None:
        """Checks the memory budget, then preallocates the feature store for every training patch."""
        num_patches = self._expected_images * patches_per_image
        self._patches_per_image = patches_per_image
        estimate = self.memory_estimate_mb(num_patches)
        if estimate["total"] > self.memory_budget_mb:
            parts = ", ".join(f"{key} {value:.0f} MB" for key, value in estimate.items() if key != "total")
            raise FrameworkError(
                f"PatchCore would need about {estimate['total']:.0f} MB ({parts}; {num_patches:,} patches) "
                f"> model.memory_budget_mb={self.memory_budget_mb:.0f}: lower model.coreset_ratio, set "
                f"model.bank_dtype=float16, reduce data.image_size, or raise model.memory_budget_mb"
            )
        self._features = torch.empty(num_patches, self.embed_dim, dtype=self.bank_dtype, device=device)

    @torch.no_grad()
    def prepare_extractor(self, image_size: int) -> None:
        """``official_batchnorm_pass``, once per fit, before its first feature is extracted: the trainer calls
        it before computing (or looking up) cached features, whose cross-run key hashes the moved statistics."""
        if self.official_batchnorm_pass and not self._batchnorm_pass_done:
            self.extractor.official_patchcore_batchnorm_pass(image_size)
            self._batchnorm_pass_done = True

    def update(self, inputs: torch.Tensor | list[torch.Tensor]) -> None:
        """Appends a batch's patch features (from images or their backbone features) to the preallocated store."""
        if self._features is None and self.official_batchnorm_pass and not self._batchnorm_pass_done:
            if not torch.is_tensor(inputs):
                raise FrameworkError("model.official_batchnorm_pass: features were extracted before the batch-norm "
                                     "pass (call prepare_extractor(image_size) before extracting them)")
            self.prepare_extractor(inputs.shape[-1])
        embedding = self.embed(inputs)
        if self._features is None:
            self._allocate(embedding.shape[1] * embedding.shape[2], embedding.device)
        embedding = embedding.reshape(-1, self.embed_dim)
        end = self._filled + embedding.shape[0]
        if end > self._features.shape[0]:
            raise FrameworkError("PatchCore received more training images than begin_fit announced")
        self._features[self._filled:end] = embedding.to(self.bank_dtype)
        self._filled = end

    def merge_across_ranks(self) -> None:
        """Every rank's patch features, in rank order (the single-process order), on every rank."""
        self._features = gather_rows(self._features[: self._filled])
        self._filled = self._features.shape[0]

    @torch.no_grad()
    def finalize(self) -> None:
        """Selects the coreset and keeps those features as the memory bank."""
        features = self._features[: self._filled]
        if features.shape[0] == 0:
            raise FrameworkError("PatchCore has no training features: the train split is empty")
        keep = torch.arange(features.shape[0], device=features.device)
        if self.coreset_ratio < 1.0:
            keep = greedy_coreset(
                features, self.coreset_ratio, self.projection_dim, self.num_start_points,
                self.coreset_seed, self.chunk_mb,
            )
            # What each greedy step must read: the projected bank plus its squared norms.
            self.coreset_stats = {"steps": keep.numel(), "bytes_per_step": features.shape[0] * (self.projection_dim + 1) * 4}
            features = features.index_select(0, keep)
        self.memory_bank = features.clone()
        self.bank_source = torch.div(keep, self._patches_per_image, rounding_mode="floor")
        self._features, self._filled = None, 0

    # -- scoring ----------------------------------------------------------------------------------
    def score_patches(self, embedding: torch.Tensor, image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Nearest-bank distances [B, 1, h, w] and the image scores [B] for embeddings [B, h, w, D].

        With ``image_ids`` [B] (the training images' indices in the fit), each image is scored against
        the bank rows of the other images only: its leave-one-image-out scores.
        """
        if self.memory_bank.numel() == 0:
            raise FrameworkError("PatchCore is not fitted: run the memory trainer (or load a checkpoint) first")
        batch, height, width, dim = embedding.shape
        queries = embedding.reshape(-1, dim)
        groups = None if image_ids is None else image_ids.repeat_interleave(height * width)
        if self.export_mode:  # evaluation only: no groups
            distances, nearest = bank_chunked_topk_nearest(queries, self.memory_bank, 1, self.chunk_mb, 8 * height * width)
            distances, nearest = distances[:, 0], nearest[:, 0]
        else:
            distances, nearest = chunked_nearest(queries, self.memory_bank, self.chunk_mb, groups, self.bank_source)
        distances = distances.reshape(batch, height * width)
        worst = distances.argmax(dim=1)
        scores = distances.gather(1, worst[:, None]).squeeze(1)
        if self.score_mode == "reweighted":
            rows = torch.arange(batch, device=queries.device) * height * width + worst
            scores = scores * self._reweight(queries[rows], nearest[rows], image_ids)
        return {"patch_scores": distances.reshape(batch, 1, height, width), "image_scores": scores}

    def leave_one_out(self, images: torch.Tensor | list[torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores of the fit's own images [B] (``indices`` = their positions in the fit) without their own patches."""
        if self.bank_source.numel() != self.memory_bank.shape[0]:
            raise FrameworkError("PatchCore's leave-one-out scores need the fit's own images in this process")
        if int(self.bank_source.max()) == int(self.bank_source.min()):
            raise FrameworkError("PatchCore's leave-one-out threshold needs a bank drawn from at least 2 training images: "
                                 "raise model.coreset_ratio, or set data.val_fraction > 0 to hold images out")
        return self.score_patches(self.embed(images), indices.to(self.memory_bank.device))

    def _reweight(self, worst_queries: torch.Tensor, matches: torch.Tensor,
                  image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Paper eq. 7: 1 − softmax over the distances to m*'s b nearest bank entries, at m* itself.

        Down-weights a worst patch whose match m* lies in a dense bank region (a rare but normal pattern).
        Leave-one-image-out scores take those neighbours from the other images' rows too.
        """
        neighbours = min(self.num_neighbors, self.memory_bank.shape[0])
        anchors = self.memory_bank.index_select(0, matches).float()
        if self.export_mode:
            _, support = bank_chunked_topk_nearest(anchors, self.memory_bank, neighbours, self.chunk_mb, len(anchors))
        else:
            _, support = chunked_topk_nearest(anchors, self.memory_bank, neighbours, self.chunk_mb,
                                              image_ids, self.bank_source)  # [B, b], m* first
        support_features = self.memory_bank[support.reshape(-1)].float().reshape(*support.shape, -1)
        distances = (support_features - worst_queries.float().unsqueeze(1)).norm(dim=-1)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.score_patches(self.embed(inputs))


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int = 128,
    num_start_points: int = 10,
    seed: int = 0,
    chunk_mb: float = 64.0,
    progress: bool = True,
) -> torch.Tensor:
    """Approximate greedy k-center selection (official PatchCore sampler); returns the kept indices.

    Points are first projected to ``projection_dim`` by a fixed random linear map (distances are
    roughly preserved, and each step then reads 128 values per point instead of 1024). The initial
    distance of every point is its mean distance to ``num_start_points`` random anchors; each step
    selects the farthest point and lowers every point's distance to its new nearest centre. Squared
    distances are tracked (same arg-max and minima as distances), with one matrix-vector product
    per step over the projected bank.
    """
    total = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(features.shape[1])  # nn.Linear's default initialisation, as the official mapper
    mapper = (torch.rand(features.shape[1], projection_dim, generator=generator) * 2 - 1).mul_(bound)
    starts = torch.randperm(total, generator=generator)[: min(num_start_points, total)]
    return greedy_select(features, mapper, starts, max(1, int(total * ratio)), chunk_mb, progress)


def greedy_select(
    features: torch.Tensor,
    mapper: torch.Tensor,
    starts: torch.Tensor,
    count: int,
    chunk_mb: float = 64.0,
    progress: bool = True,
) -> torch.Tensor:
    """The greedy steps of ``greedy_coreset`` for a given projection [D, d] and anchor indices: ``count``
    indices, each the point farthest (in ``features @ mapper``) from those already selected."""
    total, projection_dim = features.shape[0], mapper.shape[1]
    mapper = mapper.to(features.device, torch.float32)
    rows = max(1, int(chunk_mb * 2**20 // (4 * (features.shape[1] + projection_dim))))
    projected = torch.empty(total, projection_dim, device=features.device)
    for start in range(0, total, rows):
        projected[start:start + rows] = features[start:start + rows].float() @ mapper
    norms = (projected * projected).sum(1)

    starts = starts.to(features.device)
    anchors = projected[starts]
    anchor_sq = (norms[:, None] - 2 * projected @ anchors.T + norms[starts][None]).clamp_min_(0)
    min_sq = anchor_sq.sqrt_().mean(1).square_()

    selected = torch.empty(count, dtype=torch.long, device=features.device)
    distance = torch.empty_like(min_sq)
    for step in tqdm(range(count), desc="coreset", leave=False, disable=not progress, dynamic_ncols=True):
        raise_if_interrupted()  # minutes of greedy steps: a first Ctrl-C stops here too
        index = torch.argmax(min_sq)
        selected[step] = index
        centre = projected[index]
        torch.addmv(norms, projected, centre, alpha=-2, out=distance)  # the one pass over the projected bank
        distance.add_(norms[index])
        torch.minimum(min_sq, distance, out=min_sq)
    return selected
