"""Frozen-backbone features computed once: per split within a run, and per image across runs.

A frozen backbone in eval mode gives an image the same features on every pass, so a trainer that runs
it more than once over a split (PaDiM's and PatchCore's fit, threshold and evaluation passes, FastFlow's
epochs, a leave-one-out calibration over the training features) asks ``split_features`` instead: the
first call computes the split's per-stage features and keeps them on the device (``train.feature_cache_mb``),
later calls hand back the same tensors. Across runs, each image's features are also stored in
``<data.cache_dir>/features/<extractor key>/`` (``train.feature_disk_cache_mb``, least recently used entries
evicted), so a seed sweep or a rerun with the same backbone, weights, layers and preprocessing pays
the backbone once per image. A later split's features can be computed in a background thread while the
fit's own math runs (``prefetch_split_features``). The extractor key hashes every weight and buffer of the extractor, its
layers, the device type and the torch/timm versions; the image key is the decoded-image cache's (file,
preprocessing, normalisation). Stored features are float32 as computed, so results are unchanged.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from anomaly_framework.backbones.runtimes import module_digest
from anomaly_framework.dataloaders.prefetch import ThreadedLoader
from anomaly_framework.dataloaders.image_cache import ArrayStore, cache_root
from anomaly_framework.execution.distributed import is_main, world_size
from anomaly_framework.execution.interrupts import raise_if_interrupted


class CachedFeatures(Dataset):
    """One split's per-stage backbone features [N, C_i, h_i, w_i] and, when kept, the rest of each item
    (label, mask, path...): items are ``{"features": [...], **targets}``. ``images``: the image dataset
    they were computed from, which evaluation asks for the original masks (``ground_truth``).
    ``offsets`` (``data.image_size=native``): item i is rows ``offsets[i]:offsets[i + 1]`` of stages of
    tiles [ΣT, C_i, h_i, w_i], its own number of tiles."""

    def __init__(self, stages: list[torch.Tensor], targets: dict[str, torch.Tensor | list],
                 images: Dataset | None = None, offsets: list[int] | None = None) -> None:
        self.stages, self.targets, self.images, self.offsets = stages, targets, images, offsets
        self.on_device = stages[0].device.type != "cpu"  # a loader must not pin these

    def __len__(self) -> int:
        return len(self.stages[0]) if self.offsets is None else len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        rows = index if self.offsets is None else slice(self.offsets[index], self.offsets[index + 1])
        return {"features": [stage[rows] for stage in self.stages],
                **{key: values[index] for key, values in self.targets.items()}}


def item_rows(offsets: list[int] | None, indices: list[int]) -> list[int]:
    """The stage rows of items ``indices``: the items themselves, or (native) each one's tiles."""
    if offsets is None:
        return list(indices)
    return [row for index in indices for row in range(offsets[index], offsets[index + 1])]


def _concatenated(parts: list) -> torch.Tensor | list:
    """Batches of one item field joined again: tensors concatenated, lists (paths, types) chained."""
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [value for part in parts for value in part]


def _source(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    """The image dataset and index behind item ``index`` (through a torchrun shard's Subset)."""
    if isinstance(dataset, Subset):
        return dataset.dataset, dataset.indices[index]
    return dataset, index


def item_keys(dataset: Dataset) -> list[str] | None:
    """Per-item keys of the model input (file, preprocessing, normalisation), or None for datasets whose
    items are not plain files (simulated defects), which are never stored across runs."""
    keys = []
    for index in range(len(dataset)):
        source, inner = _source(dataset, index)
        if not hasattr(source, "cache_key"):
            return None
        keys.append(source.cache_key(inner))
    return keys


def extractor_key(extractor: nn.Module, device: torch.device) -> str:
    """Identifies what a frozen extractor computes: class, layers, every weight and buffer, device type,
    versions, and the runtime its frozen passes use (an exported runtime's features differ in rounding)."""
    import timm

    runtime = extractor.runtime_name(device.type) if hasattr(extractor, "runtime_name") else "torch"
    facts = (type(extractor).__name__, getattr(extractor, "backbone_name", ""), getattr(extractor, "layers", ""),
             getattr(extractor, "block_index", ""), device.type, torch.__version__, timm.__version__)
    return module_digest(extractor, *facts, *(() if runtime == "torch" else (runtime,)))


def evict(folder: Path, budget_mb: float) -> None:
    """Deletes the least recently used feature files under ``folder`` until the rest fits ``budget_mb``."""
    files = []
    for path in folder.rglob("*.npy"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= budget_mb * 2**20:
            break
        path.unlink(missing_ok=True)
        total -= size


class FeatureCacheMixin:
    """For trainers of models with a frozen extractor (``model.extract(images)``): loaders of a split
    iterate its cached features, ``{"features": [...], label, mask...}``, which ``BaseModeler.inputs``
    hands to the model. Needs ``config``, ``modeler``, ``dataloader`` and ``device`` (a BaseTrainer)."""

    def split_dataset(self, dataset: Dataset, split: str, with_targets: bool = False) -> tuple[Dataset, int | None]:
        """The split's cached features, iterated in this process (workers would only copy them); the images
        for a model without a frozen extractor (``extract`` and ``extractor``, e.g. a plugin's)."""
        model = self.modeler.model
        if not (hasattr(model, "extract") and hasattr(model, "extractor")):
            return dataset, None
        cache = self.split_features(dataset, split, with_targets)
        return (dataset, None) if cache is None else (cache, 0)

    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Per-stage feature shape [C, h, w] of one image (tiled [T, C, h, w]; native: of one tile), from one
        probe through the extractor per run."""
        if "_feature_shapes" not in self.__dict__:
            data = self.config["data"]
            size = data["tile_size"] if self.modeler.native else data["image_size"]
            with torch.no_grad():
                probe = torch.zeros(1, 3, size, size, device=self.device)
                self._feature_shapes = [tuple(feature.shape[1:]) for feature in self.modeler.extract(probe)]
        return self._feature_shapes

    def cache_size_mb(self, num_rows: int) -> float:
        """Memory the cached features of ``num_rows`` images (native: tiles) take (float32)."""
        return num_rows * sum(int(np.prod(shape)) for shape in self.feature_shapes()) * 4 / 2**20

    def tile_offsets(self, dataset: Dataset) -> list[int] | None:
        """``data.image_size=native``: where each item's tiles start in the split's stages (and their
        total last), from the files' sizes; None for square images (one row per item)."""
        if not self.modeler.native:
            return None
        counts = [self.modeler.tiles_of(*source.input_shape(inner))
                  for source, inner in (_source(dataset, index) for index in range(len(dataset)))]
        return np.cumsum([0, *counts]).tolist()

    def split_features(self, dataset: Dataset, split: str, with_targets: bool = False) -> CachedFeatures | None:
        """The split's features (and targets when asked), computed or read once per run; None when they
        exceed ``train.feature_cache_mb`` (then every pass runs the backbone)."""
        memo = self.__dict__.setdefault("_split_features", {})
        known = memo.get(id(dataset))
        if known is not None and isinstance(known[1], Future):  # computed in the background: wait for it
            with self.modeler.timer("cache_features"):
                known = memo[id(dataset)] = (dataset, known[1].result())
        if known is None or known[0] is not dataset:
            budget = self.config["train"]["feature_cache_mb"]
            offsets = self.tile_offsets(dataset)
            needed = self.cache_size_mb(len(dataset) if offsets is None else offsets[-1])
            cached = None
            if needed > budget:
                if is_main():
                    tqdm.write(f"Backbone features of the {split} split need {needed:.0f} MB > train.feature_cache_mb="
                               f"{budget}: recomputing them on every pass instead (raise the key to cache them)")
            else:
                with self.modeler.timer("cache_features"):
                    cached = self._compute(dataset, split, with_targets, offsets=offsets)
            known = memo[id(dataset)] = (dataset, cached)
        cached = known[1]
        if cached is None:
            return None
        if with_targets and not cached.targets:
            if item_keys(dataset) is None:  # targets only come from the images' pass: run it again
                del memo[id(dataset)]
                return self.split_features(dataset, split, with_targets)
            cached.targets = self._targets(dataset)
        return CachedFeatures(cached.stages, cached.targets if with_targets else {}, dataset if with_targets else None,
                              cached.offsets)

    def prefetch_split_features(self, dataset: Dataset | None, split: str, with_targets: bool = False) -> None:
        """Starts computing ``dataset``'s features in a background thread; ``split_features`` waits for them.

        The fit's statistics, coreset and threshold pass run on one core; decoding the test images and
        their backbone pass then take the other instead of following them (a cold PaDiM run on two
        cores: 2.6 s of the evaluation's wall time). Only in one process, for a split that fits
        ``train.feature_cache_mb`` and whose backbone pass runs in this process (threads, which draw no
        random numbers, so the main thread's random state is untouched).
        """
        model = self.modeler.model
        memo = self.__dict__.setdefault("_split_features", {})
        if (dataset is None or id(dataset) in memo or world_size() > 1 or not hasattr(model, "extract")
                or not hasattr(model, "extractor") or self.cache_size_mb(len(dataset)) > self.config["train"]["feature_cache_mb"]
                or not isinstance(self._backbone_loader(dataset), ThreadedLoader)):
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"{split} features")
        memo[id(dataset)] = (dataset, pool.submit(self._compute, dataset, split, with_targets, False, self.tile_offsets(dataset)))
        pool.shutdown(wait=False)  # the thread ends with its one task

    def _targets(self, dataset: Dataset) -> dict[str, torch.Tensor | list]:
        """Labels, masks, paths and defect types of an image split, without decoding its images (native:
        masks of their own sizes, kept as a list)."""
        items = [source.targets(inner) for source, inner in (_source(dataset, i) for i in range(len(dataset)))]
        ragged = ("mask",) if self.modeler.native else ()
        return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], torch.Tensor)
                and key not in ragged else [item[key] for item in items] for key in items[0]}

    def _store(self, dataset: Dataset, num_rows: int) -> tuple[ArrayStore | None, list[str] | None]:
        """The cross-run store for this split and its items' keys, or (None, None) when not stored."""
        budget = self.config["train"]["feature_disk_cache_mb"]
        keys = item_keys(dataset) if budget > 0 and self.config["data"]["cache"] else None
        if keys is None or self.cache_size_mb(num_rows) > budget:
            return None, None
        if "_extractor_key" not in self.__dict__:  # hashing every weight once per run
            tiling = self.modeler.tiling  # an image's entry holds its tiles' features: one folder per tiling
            suffix = "" if tiling is None else "-tile{}-stride{}".format(*tiling)
            self._extractor_key = extractor_key(self.modeler.model.extractor, self.device) + suffix
        return ArrayStore(cache_root(self.config["data"]["cache_dir"]) / "features" / self._extractor_key), keys

    def _compute(self, dataset: Dataset, split: str, with_targets: bool, progress: bool = True,
                 offsets: list[int] | None = None) -> CachedFeatures:
        """Reads the stored images' features, runs the backbone over the others (storing them). An entry
        holds its item's rows (native: its T tiles, ``offsets``) per stage, flattened, stage after stage."""
        shapes = self.feature_shapes()
        sizes = [int(np.prod(shape)) for shape in shapes]
        counts = [1] * len(dataset) if offsets is None else np.diff(offsets).tolist()
        stages = [torch.empty((sum(counts), *shape), device=self.device) for shape in shapes]
        store, keys = self._store(dataset, sum(counts))
        missing = list(range(len(dataset)))
        if store is not None:
            # Stored rows are gathered on the host and moved to the device once per stage, not per image.
            found, stored_rows, missing = [], [], []
            for index, key in enumerate(keys):
                stored = store.read(key)
                if stored is None or stored.size != counts[index] * sum(sizes):
                    missing.append(index)
                    continue
                with contextlib.suppress(OSError):  # evicted meanwhile, or a read-only cache
                    os.utime(store.path(key))  # recently used: kept longest by the eviction
                found.append(index)
                ends = np.cumsum([counts[index] * size for size in sizes])[:-1]
                stored_rows.append([part.reshape(counts[index], -1) for part in np.split(stored, ends)])
            if found:
                rows = item_rows(offsets, found)
                for stage, parts in zip(stages, zip(*stored_rows)):
                    stage[rows] = torch.from_numpy(np.concatenate(parts)).reshape(len(rows), *stage.shape[1:]).to(self.device)
        targets: dict[str, list] = {}
        if missing:
            self._run_backbone(Subset(dataset, missing), missing, stages, split, targets if with_targets else None,
                               progress, offsets)
            if store is not None:
                computed = [stage[item_rows(offsets, missing)].flatten(1).cpu().numpy() for stage in stages]
                start = 0
                for index in missing:
                    store.write(keys[index], np.concatenate([part[start:start + counts[index]].ravel() for part in computed]))
                    start += counts[index]
                evict(store.folder.parent, self.config["train"]["feature_disk_cache_mb"])
        if with_targets and item_keys(dataset) is not None:
            return CachedFeatures(stages, self._targets(dataset), offsets=offsets)
        return CachedFeatures(stages, {key: _concatenated(parts) for key, parts in targets.items()}, offsets=offsets)

    def _backbone_loader(self, dataset: Dataset) -> ThreadedLoader | torch.utils.data.DataLoader:
        """The loader of a backbone pass: in-process threads when the data loader would use no workers
        (decoding off the backbone's path), else the data loader's own (and at native size, whose batches
        are lists: the threads' default collation stacks)."""
        loader = self.dataloader.make_loader(dataset, shuffle=False)
        if loader.num_workers == 0 and not loader.pin_memory and not self.modeler.native:
            return ThreadedLoader(dataset, loader.batch_size)
        return loader

    def _run_backbone(self, subset: Subset, indices: list[int], stages: list[torch.Tensor], split: str,
                      targets: dict[str, list] | None, progress: bool = True, offsets: list[int] | None = None) -> None:
        """Fills ``stages`` at the rows of items ``indices`` with the extractor's features; collects the
        batches' targets."""
        start = 0
        loader = self._backbone_loader(subset)
        # fork_rng: iterating a DataLoader draws a seed, which would change every later shuffle (threads draw none).
        drawing = contextlib.nullcontext() if isinstance(loader, ThreadedLoader) else torch.random.fork_rng(devices=[])
        with drawing, torch.no_grad():
            for batch in tqdm(loader, desc=f"cache {split} features", leave=False, disable=not (progress and is_main())):
                raise_if_interrupted()
                features = self.modeler.extract(self.modeler.images(batch))  # tiled: [B, T, ...]; native: [ΣT, ...]
                count = len(batch["image"])
                rows = torch.tensor(item_rows(offsets, indices[start:start + count]), device=self.device)
                for stage, feature in zip(stages, features):
                    stage[rows] = feature.float()
                start += count
                if targets is not None:
                    for key, value in batch.items():
                        if key != "image":
                            targets.setdefault(key, []).append(value)
