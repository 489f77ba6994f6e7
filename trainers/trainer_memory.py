"""The trainer of one-pass memory models (PaDiM, PatchCore): collect features once, then fit buffers."""
from __future__ import annotations

import time

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from distributed import is_main, shard, world_size
from registry import TRAINER_REGISTRY
from trainers.feature_cache import FeatureCacheMixin
from trainers.trainer_base import BaseTrainer, Predictions
from utils import StageTimer


@TRAINER_REGISTRY.register("memory")
class MemoryTrainer(FeatureCacheMixin, BaseTrainer):
    """One pass over train/good under ``torch.inference_mode()``, then the modeler's explicit ``fit``.

    The frozen backbone runs once per image (``feature_cache``): the fit, the threshold pass and any
    later pass over the training split (a leave-one-out calibration) read the same cached features.
    """

    def run_epoch(self, loader, train: bool = True, desc: str = "collect") -> dict[str, float]:
        images = 0
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main()):
                self.modeler.training_step(batch)
                images += len(batch["features"][0] if "features" in batch else batch["label"])
        return {"images": images}

    def fit(self) -> dict:
        """Under torchrun each rank collects a contiguous shard; the shards are merged in rank order and
        rank 0 builds the buffers (PaDiM's covariances, PatchCore's coreset)."""
        self.modeler.timer = StageTimer(self.device)
        start = time.perf_counter()
        dataset = self.dataloader.train_dataset
        if world_size() > 1:
            dataset = Subset(dataset, list(shard(len(dataset))))
        self.modeler.begin_fit(len(dataset))
        prepare = getattr(self.modeler.model, "prepare_extractor", None)  # PatchCore's official batch-norm pass
        if prepare is not None:
            prepare(self.config["data"]["image_size"])  # before any feature is computed or looked up
        source, workers = self.split_dataset(dataset, "train")
        loader = self.dataloader.make_loader(source, shuffle=False, num_workers=workers)
        summary = self.run_epoch(loader, desc="fit")
        if world_size() > 1:
            self.modeler.model.merge_across_ranks()
            summary["images"] = len(self.dataloader.train_dataset)
        if is_main():
            self.modeler.fit()
        self.timings.update(self.modeler.timer.as_dict("fit_"))
        self.timings["fit"] = time.perf_counter() - start
        summary = {"epochs": 1, "train_images": summary["images"]}
        if is_main() and self.modeler.metrics is not None:
            summary.update(self.modeler.metrics.compute_fit_metrics(self.modeler.model))
        return summary

    def normal_predictions(self) -> tuple[Predictions, str]:
        """Without held-out images, each training image scored leave-one-out (``model.leave_one_out``).

        A memory model memorises its training images (PatchCore's own patches are in the bank at
        distance 0; PaDiM's Gaussians include them), so their in-sample scores fall below every unseen
        normal image's and a threshold on them flags nearly everything. Leave-one-out costs one pass,
        as the in-sample scores did, and keeps every image in the fit.
        """
        if self.dataloader.valid_dataset is not None:
            return super().normal_predictions()
        loader = self.eval_loader(self.dataloader.train_dataset, "train")  # the fit's order, its cached features
        return self.predict(loader, desc="threshold", held_out=True), "train/good, leave-one-image-out"
