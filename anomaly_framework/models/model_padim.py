"""PaDiM: a Gaussian per patch position over pretrained CNN features.

Defard, Setkov, Loesch, Audigier, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", ICPR Workshops 2020 (arXiv 2011.08785). Reference code:
xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from anomaly_framework.backbones.extractors import TimmFeatureExtractor

from anomaly_framework.backbones.weights import arch_name

from anomaly_framework.models.model_base import FittedBuffersMixin, FrozenExtractorMixin
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.errors import FrameworkError

# Channels kept by the paper's random dimension reduction (Rd100 for R18, Rd550 for WR50).
PAPER_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
# Other backbones keep this many (the WR50 setting), or all their channels if they have fewer.
DEFAULT_N_FEATURES = 550
# Regularises the covariance so it is always invertible, as in the paper (eq. 1).
COVARIANCE_EPS = 0.01
# The state-dict key of the stored upper triangles of the inverse covariances.
PACKED_KEY = "inv_covariance_upper"
# Covariances factorised at once by finalize (float32: this / (4·d²) positions) and the leave-one-out scores (float64).
POSITION_CHUNK_BYTES = 64 * 2**20
# The factors are kept across the calibration pass's batches up to this size (Lite0 at 224 px: 0.8 GB), and
# recomputed for each batch above it (WR50's 550 channels: 7.6 GB).
LEAVE_ONE_OUT_CACHE_BYTES = 2**30


def _exporting() -> bool:
    """Traced for an export (TorchScript, ONNX): shapes must stay symbolic and tensors out of place."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def memory_bytes(device: torch.device) -> int | None:
    """The memory the statistics live in: the GPU's, or this machine's RAM (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def check_statistics_fit(positions: int, dim: int, device: torch.device) -> None:
    """The fit holds the scatter and then the inverse, [positions, d, d] float32 each: refuses, before they are
    allocated, sizes beyond the device's memory (a tiled ensemble at 896 px with 49 tile positions: 38 GB)."""
    needed, total = 2 * positions * dim * dim * 4, memory_bytes(device)
    if total is not None and needed > total:
        raise FrameworkError(f"PaDiM's statistics need {needed / 2**30:.1f} GB ({positions} Gaussians of {dim} dimensions, "
                             f"scatter and inverse) but the {device.type} has {total / 2**30:.1f} GB: lower data.image_size "
                             "or model.n_features, raise data.tile_stride, or set model.tile_ensemble=false")


@MODEL_REGISTRY.register("padim")
class PadimModel(FrozenExtractorMixin, FittedBuffersMixin, nn.Module):
    """Multivariate Gaussian per embedding position; the anomaly map is the Mahalanobis distance.

    Statistics accumulate in one streaming pass (Chan et al.'s pairwise update of mean and centred
    scatter), so memory stays at one covariance per position whatever the number of training images.

    Args:
        backbone: timm architecture (paper: ``wide_resnet50_2`` or ``resnet18``).
        layers: feature indices whose maps are concatenated (paper: layer1–3 = indices 1, 2, 3).
        pretrained: ImageNet weights for the backbone.
        weights: explicit weights file.
        n_features: channels kept by the random subset; None = the paper's value for R18/WR50, else
            min(550, all channels).
        sigma: Gaussian smoothing of the upsampled map (paper: 4).
        feature_seed: seed of the random channel subset (the config passes the run's seed unless
            ``model.feature_seed`` is set; the reference code's Python ``random`` draw with seed 1024
            cannot be reproduced by torch, so no particular seed is the paper's).
        tile_ensemble: tiled runs (``data.tile_size``): one Gaussian set per tile position (the "tiled
            ensemble") instead of one shared by every tile. The modeler then hands over whole images' tiles
            in tile order and sets ``tile_positions``; the fitted buffers hold the positions of all tile
            positions, [T·h·w, ...] (a fitted model reads T from them).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights: str | None = None,
        n_features: int | None = None,
        sigma: float = 4.0,
        feature_seed: int = 1024,
        tile_ensemble: bool = False,
    ) -> None:
        super().__init__()
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights)
        total = sum(self.extractor.channels)
        if n_features is None:
            n_features = PAPER_N_FEATURES.get(arch_name(backbone), min(DEFAULT_N_FEATURES, total))
        if not 0 < n_features <= total:
            raise FrameworkError(f"model.n_features must be in 1..{total} for {backbone} {layers}, got {n_features}")
        self.sigma = sigma
        self.tile_ensemble = tile_ensemble
        # Tile positions with their own Gaussians in the next fit (the modeler sets it; 1 = shared or untiled).
        self.tile_positions = 1
        generator = torch.Generator().manual_seed(feature_seed)
        subset = torch.randperm(total, generator=generator)[:n_features].sort().values
        self.register_buffer("feature_index", subset)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))
        self._count = 0
        self._scatter: torch.Tensor | None = None
        # n and the scatter of the last fit, for the leave-one-out scores (not saved: calibration follows the fit).
        self.fit_images = 0
        self._fit_scatter: torch.Tensor | None = None
        self._refit_factors: dict[int, torch.Tensor] = {}  # leave_one_out's Cholesky factors by first position

    def embed(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Concatenated, channel-subset features on the first layer's grid [B, d, h, w], from images
        [B, 3, H, W] or the per-layer features ``extract`` gave for them (a view of ``_by_position``'s stack).

        Deeper maps are upsampled by nearest neighbour, which equals the reference code's unfold/fold.
        """
        stacked, (height, width) = self._by_position(inputs)
        return stacked.reshape(height, width, *stacked.shape[1:]).permute(3, 2, 0, 1)

    def begin_fit(self, num_images: int) -> None:
        """Streaming statistics need no reservation; starts a fresh accumulation."""
        self._count, self._scatter = 0, None

    def _by_position(self, inputs: torch.Tensor | list[torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, tuple[int, int]]:
        """The embedding as one [P, d, B] stack per position and its grid (h, w), P = h·w: contiguous, so
        the batched products read each position's [d, B] block in one piece (on the strided layout of a
        [B, d, h, w] embedding the scatter update ran 1.9x and the batch mean 25x slower: Lite0, batch 32,
        one thread). An export traces the plain recipe instead, whose shapes stay symbolic."""
        features = self.extract(inputs) if isinstance(inputs, torch.Tensor) else inputs
        height, width = features[0].shape[-2:]
        if _exporting():
            return self._concatenated(features).to(dtype).flatten(2).permute(2, 1, 0), (height, width)
        return self._stacked(features, dtype), (height, width)

    def _centred(self, inputs: torch.Tensor | list[torch.Tensor],
                 dtype: torch.dtype) -> tuple[torch.Tensor, int, tuple[int, int]]:
        """The embedding minus the fitted means [G·P, d, B] (in place but when exported), with the fitted
        tile positions G (1 unless a tiled ensemble) and the grid (h, w)."""
        stacked, (height, width) = self._by_position(inputs, dtype)
        groups = self._fitted_groups(height * width)
        centred, mean = self._grouped(stacked, groups), self.mean.to(dtype).unsqueeze(2)
        return (centred - mean if _exporting() else centred.sub_(mean)), groups, (height, width)

    def _concatenated(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The reference recipe [B, d, h, w]: deeper maps upsampled to the first grid by nearest neighbour
        (equal to the reference code's unfold/fold), concatenated, then the channel subset."""
        grid = features[0].shape[-2:]
        aligned = [features[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in features[1:]]
        return torch.cat(aligned, dim=1).index_select(1, self.feature_index)

    def _stacked(self, features: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``_concatenated`` as a contiguous [P, d, B] stack, each layer's kept channels written straight into
        it, repeated where the grids differ by a whole factor: no concatenated copy (6x faster, Lite0)."""
        batch, (height, width) = features[0].shape[0], features[0].shape[-2:]
        stacked = features[0].new_empty((height, width, self.feature_index.numel(), batch), dtype=dtype)
        first = 0  # the layer's first channel among all of them
        for feature in features:
            channels, rows, cols = feature.shape[1:]
            slots = ((self.feature_index >= first) & (self.feature_index < first + channels)).nonzero()[:, 0]
            chosen = self.feature_index[slots] - first  # the layer's kept channels, in the stack's order
            first += channels
            if slots.numel() == 0:
                continue
            if not torch.equal(chosen, torch.arange(channels, device=chosen.device)):
                feature = feature.index_select(1, chosen)
            if height % rows or width % cols:
                feature, rows, cols = F.interpolate(feature, size=(height, width), mode="nearest"), height, width
            # The kept channels' places in the stack: a slice when in order (the sorted default), else indices.
            start = int(slots[0])
            if torch.equal(slots, torch.arange(start, start + slots.numel(), device=slots.device)):
                slots = slice(start, start + slots.numel())
            blocks = stacked.view(rows, height // rows, cols, width // cols, -1, batch)
            blocks[:, :, :, :, slots] = feature.permute(2, 3, 1, 0)[:, None, :, None]  # broadcast: the repetition
        return stacked.view(height * width, -1, batch)

    def _grouped(self, stacked: torch.Tensor, groups: int) -> torch.Tensor:
        """[P, d, B·G] of B images' G tiles each (image by image, tiles in order) → [G·P, d, B]: each tile
        position's grid positions are Gaussians of their own (the tiled ensemble). G = 1: ``stacked`` itself."""
        if groups == 1:
            return stacked
        positions, dim, count = stacked.shape
        if count % groups:
            raise FrameworkError(f"PaDiM's tiled ensemble takes whole images: {count} tiles are not a multiple "
                                 f"of its {groups} tile positions")
        return stacked.reshape(positions, dim, -1, groups).permute(3, 0, 1, 2).reshape(groups * positions, dim, -1)

    def _fitted_groups(self, positions: int) -> int:
        """Tile positions of the fitted Gaussians (1 unless a tiled ensemble): their rows per grid of ``positions``."""
        return max(1, self.mean.shape[0] // positions)

    @staticmethod
    def _as_maps(values: torch.Tensor, groups: int, height: int, width: int) -> torch.Tensor:
        """Per-position values [G·P, B] → maps [B·G, 1, h, w], a map per tile (image by image, tiles in order)."""
        return values.reshape(groups, height * width, -1).permute(2, 0, 1).reshape(-1, 1, height, width)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor | list[torch.Tensor]) -> None:
        """Adds a batch of normal images (or their features) to the running per-position mean and scatter."""
        stacked, _ = self._by_position(inputs, torch.float32)
        samples = self._grouped(stacked, self.tile_positions)  # [G·P, d, B]
        batch = samples.shape[2]
        batch_mean = samples.mean(dim=2)
        centred = samples.sub_(batch_mean.unsqueeze(2))
        if self._count == 0:
            check_statistics_fit(samples.shape[0], samples.shape[1], samples.device)
            self.mean, self._scatter = batch_mean, centred @ centred.mT  # [P, d, d]
        else:
            # In place: a [P, d, d] temporary per batch (800 MB for Lite0 at 320 px) would dominate the fit.
            total = self._count + batch
            delta = batch_mean - self.mean
            self._scatter.baddbmm_(centred, centred.mT)
            self._scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=self._count * batch / total)
            self.mean += delta * (batch / total)
        self._count += batch

    @torch.no_grad()
    def merge_across_ranks(self) -> None:
        """Combines every rank's running statistics into those of all images (Chan et al.'s pairwise
        update, summed with all-reduce so no rank holds more than one scatter tensor)."""
        device = self.mean.device
        count = torch.tensor([float(self._count)], dtype=torch.float64, device=device)
        weighted_mean = self.mean.double() * self._count
        dist.all_reduce(count)
        dist.all_reduce(weighted_mean)
        mean = (weighted_mean / count).float()
        delta = self.mean - mean
        scatter = self._scatter + delta.unsqueeze(2) * delta.unsqueeze(1) * self._count
        dist.all_reduce(scatter)
        self.mean, self._scatter, self._count = mean, scatter, int(count.item())

    @torch.no_grad()
    def finalize(self) -> None:
        """Turns the accumulated scatter into the regularised inverse covariance, in place."""
        if self._count < 2:
            raise FrameworkError(f"PaDiM needs at least 2 training images, got {self._count}")
        # Out of place: the accumulators were made under inference mode, the buffers must outlive it. A chunk of
        # positions at a time: the peak is the scatter, the inverse and one chunk's temporaries (a whole-array
        # pass held four [P, d, d] arrays: 25 GB for Lite0's tiled ensemble of 16 tiles).
        inverse = torch.empty_like(self._scatter)
        step = max(1, POSITION_CHUNK_BYTES // (4 * inverse.shape[-1] ** 2))
        for start in range(0, len(inverse), step):
            block = slice(start, start + step)
            covariance = self._scatter[block] / (self._count - 1)
            covariance.diagonal(dim1=1, dim2=2).add_(COVARIANCE_EPS)
            # Symmetric positive definite (scatter + ε·I): a Cholesky inverse is as accurate and 1.8× faster
            # than LU (3136 inverses of 176² for Lite0 at 224 px: 1.7 s instead of 3.0 s on one core).
            factor_inverse = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
            # Exactly symmetric (rounding-level asymmetry otherwise) and row-major as a loaded checkpoint is,
            # so that storing one triangle is lossless and a reloaded model scores bit for bit the same.
            torch.add(factor_inverse, factor_inverse.mT, out=inverse[block]).mul_(0.5)
        self.inv_covariance = inverse
        self.mean = self.mean.clone()
        # Kept for leave_one_out (as large as the inverse; the peak above already held both).
        self._fit_scatter, self._refit_factors = self._scatter, {}
        self.fit_images, self._scatter, self._count = self._count, None, 0

    # -- storage: one triangle of each symmetric inverse covariance (half the checkpoint, bit for bit) ---
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 (torch hook)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        inverse = destination.pop(prefix + "inv_covariance")
        if inverse.numel():
            dim = inverse.shape[-1]
            rows, cols = torch.triu_indices(dim, dim, device=inverse.device)
            # index_select on the flattened matrices: half the time of inverse[:, rows, cols], same values
            destination[prefix + PACKED_KEY] = inverse.flatten(1).index_select(1, rows * dim + cols)  # [P, d(d+1)/2]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 (torch hook)
        packed = state_dict.pop(prefix + PACKED_KEY, None)
        if packed is not None:
            dim = self.feature_index.numel()
            rows, cols = torch.triu_indices(dim, dim, device=packed.device)
            inverse = packed.new_empty(packed.shape[0], dim, dim)
            inverse[:, rows, cols] = packed
            inverse[:, cols, rows] = packed
            state_dict[prefix + "inv_covariance"] = inverse
        elif prefix + "inv_covariance" not in state_dict:
            state_dict[prefix + "inv_covariance"] = self.inv_covariance  # not fitted: stays empty
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _squared_distance(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Squared Mahalanobis distance of every position's embedding to its Gaussian [B, 1, h, w], from
        images or their features."""
        if self.inv_covariance.numel() == 0:
            raise FrameworkError("PaDiM is not fitted: run the memory trainer (or load a checkpoint) first")
        centred, groups, (height, width) = self._centred(inputs, torch.float32)  # [G·P, d, B]
        squared = ((self.inv_covariance @ centred) * centred).sum(1)  # [G·P, B]
        return self._as_maps(squared.clamp_min(0), groups, height, width)

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mahalanobis distance of every position's embedding to its Gaussian [B, 1, h, w] (images or features)."""
        return {"patch_scores": self._squared_distance(inputs).sqrt()}

    def leave_one_out(self, images: torch.Tensor | list[torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Distances of training images to the Gaussians refitted without each of them [B, 1, h, w].

        For a training embedding x with d = x − μ, the other n−1 images have mean μ₋ with
        x − μ₋ = n/(n−1)·d and scatter S − n/(n−1)·ddᵀ; refitted with their normaliser n−2 and the same
        ε·I, the covariance is M − c·ddᵀ with M = S/(n−2) + ε·I and c = n/((n−1)(n−2)), so by
        Sherman–Morrison the squared distance is (n/(n−1))²·q / (1 − c·q), q = dᵀM⁻¹d.
        When n−1 ≤ d an image is its own direction of S, and 1 − c·q ≈ ε/λ is a difference of two
        numbers near 1: float32 (the stored inverse) returns noise there (thresholds of 10⁶ against
        scores of 10³), so q comes from a float64 Cholesky factor of M, a chunk of positions at a time.
        ``images`` must be the fit's own images (``indices`` is unused: each image is its own left-out one).
        """
        count = self.fit_images
        if count < 3 or self._fit_scatter is None:
            raise FrameworkError("PaDiM's leave-one-out scores need the fit's own images (at least 3) in this process")
        centred, groups, (height, width) = self._centred(images, torch.float64)  # [G·P, d, B]
        positions, dim, batch = centred.shape
        downdate = count / ((count - 1) * (count - 2))
        step = max(1, POSITION_CHUNK_BYTES // (8 * dim * dim))
        squared = torch.empty(positions, batch, dtype=torch.float64, device=centred.device)
        for start in range(0, positions, step):
            block = slice(start, start + step)
            solved = torch.linalg.solve_triangular(self._refit_factor(block, count), centred[block], upper=False)
            quadratic = solved.square().sum(dim=1)
            # The refitted covariance is positive definite (ε·I), so 1 − c·q > 0 up to float64 rounding.
            squared[block] = quadratic * (count / (count - 1)) ** 2 / (1 - downdate * quadratic).clamp_min(1e-300)
        return {"patch_scores": self._as_maps(squared, groups, height, width).sqrt().float()}

    def _refit_factor(self, block: slice, count: int) -> torch.Tensor:
        """Float64 Cholesky factor of M = S/(n−2) + ε·I at the positions of ``block``, kept when all fit
        ``LEAVE_ONE_OUT_CACHE_BYTES`` (the calibration pass then factorises once, not once per batch)."""
        factor = self._refit_factors.get(block.start)
        if factor is None:
            refit = self._fit_scatter[block].to(torch.float64, copy=True).div_(count - 2)  # M, in place
            refit.diagonal(dim1=1, dim2=2).add_(COVARIANCE_EPS)
            factor = torch.linalg.cholesky(refit)
            if self._fit_scatter.numel() * 8 <= LEAVE_ONE_OUT_CACHE_BYTES:
                self._refit_factors[block.start] = factor
        return factor
