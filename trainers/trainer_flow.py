"""The trainer of normalizing-flow models (FastFlow): the gradient trainer's machinery, full batches only.

FastFlow's reference drops the last incomplete batch, whose noisier log-likelihood estimate would
otherwise weigh as much as a full one. The backbone is frozen and training has no augmentation, so each
image's backbone features are the same in every epoch: they are computed once and kept on the device
(``train.feature_cache_mb``), which leaves only the flows to run per epoch.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distributed import is_main
from registry import TRAINER_REGISTRY
from trainers.trainer_gradient import GradientTrainer


class CachedFeatures(Dataset):
    """One split's per-stage backbone features [N, C_i, h_i, w_i] and, for simulated defects, their masks;
    items are ``{"features": [...]}`` (and ``"mask"``)."""

    def __init__(self, stages: list[torch.Tensor], masks: torch.Tensor | None = None) -> None:
        self.stages, self.masks = stages, masks

    def __len__(self) -> int:
        return len(self.stages[0])

    def __getitem__(self, index: int) -> dict:
        item = {"features": [stage[index] for stage in self.stages]}
        if self.masks is not None:
            item["mask"] = self.masks[index]
        return item


@TRAINER_REGISTRY.register("flow")
class FlowTrainer(GradientTrainer):
    """Early stopping on held-out normal images' loss, resume and NaN guard, as the gradient trainer."""

    drop_last = True

    def cache_size_mb(self, num_images: int) -> float:
        """Memory the cached features of ``num_images`` images take, from one image's feature shapes."""
        size = self.config["data"]["image_size"]
        model = self.modeler.model
        probe = torch.zeros(1, 3, size, size, device=self.device)
        bytes_per_image = sum(feature.numel() * feature.element_size() for feature in model.extract(probe))
        return num_images * bytes_per_image / 2**20

    def cached(self, dataset, split: str, keep_masks: bool = False) -> CachedFeatures | None:
        """The split's features (and masks) computed once, or None when they exceed ``train.feature_cache_mb``."""
        budget = self.config["train"]["feature_cache_mb"]
        needed = self.cache_size_mb(len(dataset))
        if needed > budget:
            if is_main():
                tqdm.write(f"Backbone features of the {split} split need {needed:.0f} MB > train.feature_cache_mb="
                           f"{budget}: recomputing them every epoch instead (raise the key to cache them)")
            return None
        stages: list[torch.Tensor] = []
        masks = []
        start = 0
        # fork_rng: iterating a loader draws a seed, which would change every later shuffle.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), self.modeler.timer("cache_features"):
            loader = self.dataloader.make_loader(dataset, shuffle=False)
            for batch in tqdm(loader, desc=f"cache {split} features", leave=False, disable=not is_main()):
                features = self.modeler.model.extract(self.modeler.images(batch))
                if not stages:  # preallocated once the shapes are known
                    stages = [torch.empty((len(dataset), *f.shape[1:]), dtype=f.dtype, device=f.device)
                              for f in features]
                for stage, feature in zip(stages, features):
                    stage[start:start + len(feature)] = feature
                start += len(features[0])
                if keep_masks:
                    masks.append(batch["mask"])
        return CachedFeatures(stages, torch.cat(masks) if keep_masks else None)

    def train_loader(self) -> DataLoader:
        dataset = self.dataloader.train_dataset
        cache = self.cached(dataset, "train")
        return self.training_loader(dataset) if cache is None else self.training_loader(cache, num_workers=0)

    def valid_loader(self) -> DataLoader | None:
        dataset = self.dataloader.valid_dataset
        if dataset is None:
            return None
        cache = self.cached(dataset, "valid")
        return self.dataloader.valid_loader() if cache is None else \
            self.dataloader.make_loader(cache, shuffle=False, num_workers=0)

    def defect_loader(self) -> DataLoader | None:
        if self.config["train"]["monitor"] != "synthetic_pixel_auroc":
            return None
        defects = self.simulated_defects()
        cache = self.cached(defects, "simulated-defect", keep_masks=True)
        return self.dataloader.make_loader(defects if cache is None else cache, shuffle=False,
                                           num_workers=None if cache is None else 0)
