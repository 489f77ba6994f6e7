"""The trainer of one-pass memory models (PaDiM, PatchCore): collect features once, then fit buffers."""
from __future__ import annotations

import copy
import time
import warnings

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from anomaly_framework.execution.distributed import is_main, shard, world_size
from anomaly_framework.execution.interrupts import raise_if_interrupted
from anomaly_framework.registry import TRAINER_REGISTRY
from anomaly_framework.trainers.feature_cache import FeatureCacheMixin
from anomaly_framework.trainers.trainer_base import BaseTrainer, Predictions
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import StageTimer

# Folds of the cross-fitted calibration of a memory model that cannot leave one image out (a plugin's):
# each fold model sees 80 % of the images, as the trained families' 20 % held-out share.
CROSS_FIT_FOLDS = 5


def tiles_in(offsets: list[int] | None, indices) -> int | None:
    """How many tiles the images at ``indices`` hold (native size), None for square images."""
    return None if offsets is None else sum(offsets[index + 1] - offsets[index] for index in indices)


@TRAINER_REGISTRY.register("memory")
class MemoryTrainer(FeatureCacheMixin, BaseTrainer):
    """One pass over train/good under ``torch.inference_mode()``, then the modeler's explicit ``fit``.

    The frozen backbone runs once per image (``feature_cache``): the fit, the threshold pass and any
    later pass over the training split (a leave-one-out calibration) read the same cached features.
    """

    def run_epoch(self, data_loader: DataLoader, epoch: int = 1, num_epochs: int = 1,
                  mode: str = "train") -> dict[str, float]:
        """Collects every batch's features; memory models have nothing to validate."""
        if mode != "train":
            raise FrameworkError(f"run_epoch mode {mode!r}: memory models only collect training images (mode 'train')")
        images = 0
        with torch.inference_mode():
            for batch in tqdm(data_loader, desc="fit", leave=False, dynamic_ncols=True, disable=not is_main()):
                raise_if_interrupted()
                self.modeler.training_step(batch)
                images += len(batch["features"][0] if "features" in batch else batch["label"])
        return {"images": images}

    def fit(self, train_loader: DataLoader | None = None, num_epochs: int | None = None,
            valid_loader: DataLoader | None = None) -> dict:
        """One pass over the training images in order (``num_epochs`` and ``valid_loader`` do not apply).

        Under torchrun each rank collects a contiguous shard; the shards are merged in rank order and
        rank 0 builds the buffers (PaDiM's covariances, PatchCore's coreset)."""
        train_loader, num_epochs, _ = self.fit_arguments(train_loader, num_epochs, valid_loader)
        if num_epochs != 1:
            warnings.warn(f"num_epochs={num_epochs} ignored: memory models fit in one pass over the training images")
        self.modeler.timer = StageTimer(self.device)
        start = time.perf_counter()
        dataset = full = train_loader.dataset
        if world_size() > 1:
            dataset = Subset(dataset, list(shard(len(dataset))))
        # Native size: images have their own numbers of tiles; where each one's first tile lies in the fit
        # (every rank's shard, in rank order) for leave-one-tile-out, and how many this rank collects.
        offsets = self.tile_offsets(full)
        self.modeler.fit_tile_offsets = None if offsets is None else torch.tensor(offsets)
        mine = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
        self.modeler.begin_fit(len(dataset), tiles_in(offsets, mine))
        prepare = getattr(self.modeler.model, "prepare_extractor", None)  # PatchCore's official batch-norm pass
        if prepare is not None:
            prepare(self.config["data"].get("tile_size") or self.config["data"]["image_size"])  # before any feature is computed or looked up
        source, workers = self.split_dataset(dataset, "train")
        # The test split's decoding and backbone pass overlap the fit's math (one core) from here on.
        self.prefetch_split_features(self.dataloader.test_dataset, "test", with_targets=True)
        # In order, whatever the given loader's order: the coreset's start points are bank positions.
        loader = self.dataloader.make_loader(source, shuffle=False, num_workers=workers, batch_size=train_loader.batch_size)
        summary = self.run_epoch(loader)
        if world_size() > 1:
            self.modeler.model.merge_across_ranks()
            summary["images"] = len(full)
        if is_main():
            self.modeler.fit()
        self.timings.update(self.modeler.timer.as_dict("fit_"))
        self.timings["fit"] = time.perf_counter() - start
        summary = {"epochs": 1, "train_images": summary["images"],
                   "history": [{"epoch": 1, "train": {"images": summary["images"]}, "valid": {}}]}
        compute_fit_metrics = getattr(self.modeler.metrics, "compute_fit_metrics", None)
        if is_main() and compute_fit_metrics is not None:
            summary.update(compute_fit_metrics(self.modeler.model))
        return summary

    def normal_predictions(self) -> tuple[Predictions, str]:
        """Normal scores out of sample: held-out images if any, else each training image scored
        leave-one-out (``model.leave_one_out``), else (a plugin's model) cross-fitted.

        A memory model memorises its training images (PatchCore's own patches are in the bank at
        distance 0; PaDiM's Gaussians include them), so their in-sample scores fall below every unseen
        normal image's and a threshold on them flags nearly everything. Leave-one-out costs one pass,
        as the in-sample scores did, and keeps every image in the fit.
        """
        if self.dataloader.valid_dataset is not None:
            return super().normal_predictions()
        loader = self.eval_loader(self.dataloader.train_dataset, "train")  # the fit's order, its cached features
        if hasattr(self.modeler.model, "leave_one_out"):
            # tiled: each tile without its own features; a tiled ensemble: each image (one sample per Gaussian)
            unit = "tile" if self.modeler.tiling and self.modeler.tile_group() == 1 else "image"
            return self.predict(loader, desc="threshold", held_out=True), f"train/good, leave-one-{unit}-out"
        folds = min(CROSS_FIT_FOLDS, len(loader.dataset))
        return self.cross_fitted(loader, folds), f"train/good, {folds}-fold cross-fitted"

    def cross_fitted(self, loader: DataLoader, folds: int) -> Predictions:
        """Each fold's images scored by a copy of the model fitted on the other folds (images i ≡ f mod
        ``folds``); the fitted model itself is left as it was. Costs one more fit's worth of ``update``
        and ``finalize`` calls per fold, over the same cached images or features.

        The fold models see (folds−1)/folds of the images, so their scores run slightly higher than
        the full fit's on new images: a conservative threshold.
        """
        fitted, parts, source, workers = self.modeler.model, [], loader.dataset, loader.num_workers
        try:
            for fold in range(folds):
                kept = [i for i in range(len(source)) if i % folds != fold]
                self.modeler.model = copy.deepcopy(fitted)
                self.modeler.begin_fit(len(kept), tiles_in(self.tile_offsets(self.dataloader.train_dataset), kept))
                self.run_epoch(self.dataloader.make_loader(Subset(source, kept), shuffle=False, num_workers=workers))
                self.modeler.fit()
                held = self.dataloader.make_loader(Subset(source, range(fold, len(source), folds)), shuffle=False,
                                                   num_workers=workers)
                parts.append(self.predict(held, desc=f"threshold (fold {fold + 1}/{folds})"))
        finally:
            self.modeler.model = fitted
        return Predictions.concatenate(parts)
