"""The trainer of normalizing-flow models (FastFlow): the gradient trainer's machinery, full batches only.

FastFlow's reference drops the last incomplete batch, whose noisier log-likelihood estimate would
otherwise weigh as much as a full one. The backbone is frozen and training has no augmentation, so each
image's backbone features are the same in every epoch: they are computed once and kept on the device
(``train.feature_cache_mb``), which leaves only the flows to run per epoch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distributed import is_main
from registry import TRAINER_REGISTRY
from trainers.trainer_gradient import GradientTrainer


class CachedFeatures(Dataset):
    """One split's per-stage backbone features [N, C_i, h_i, w_i] and, when kept, the rest of each item
    (label, mask, path...): items are ``{"features": [...], **targets}``."""

    def __init__(self, stages: list[torch.Tensor], targets: dict[str, torch.Tensor | list]) -> None:
        self.stages, self.targets = stages, targets

    def __len__(self) -> int:
        return len(self.stages[0])

    def __getitem__(self, index: int) -> dict:
        return {"features": [stage[index] for stage in self.stages],
                **{key: values[index] for key, values in self.targets.items()}}


def _concatenated(parts: list) -> torch.Tensor | list:
    """Batches of one item field joined again: tensors concatenated, lists (paths, types) chained."""
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [value for part in parts for value in part]


@TRAINER_REGISTRY.register("flow")
class FlowTrainer(GradientTrainer):
    """Early stopping on held-out normal images' loss, resume and NaN guard, as the gradient trainer."""

    drop_last = True

    def cache_size_mb(self, num_images: int) -> float:
        """Memory the cached features of ``num_images`` images take, from one image's feature shapes."""
        size = self.config["data"]["image_size"]
        probe = torch.zeros(1, 3, size, size, device=self.device)
        bytes_per_image = sum(feature.numel() * feature.element_size() for feature in self.modeler.model.extract(probe))
        return num_images * bytes_per_image / 2**20

    def cached(self, dataset: Dataset, split: str, with_targets: bool = False) -> CachedFeatures | None:
        """The split's features (and targets) computed once, or None when they exceed ``train.feature_cache_mb``."""
        budget = self.config["train"]["feature_cache_mb"]
        needed = self.cache_size_mb(len(dataset))
        if needed > budget:
            if is_main():
                tqdm.write(f"Backbone features of the {split} split need {needed:.0f} MB > train.feature_cache_mb="
                           f"{budget}: recomputing them every epoch instead (raise the key to cache them)")
            return None
        stages: list[torch.Tensor] = []
        targets: dict[str, list] = {}
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
                for key, value in batch.items():
                    if with_targets and key != "image":
                        targets.setdefault(key, []).append(value)
        return CachedFeatures(stages, {key: _concatenated(parts) for key, parts in targets.items()})

    def split_dataset(self, dataset: Dataset, split: str, with_targets: bool = False) -> tuple[Dataset, int | None]:
        """The split's cached features, iterated in this process (workers would only copy them)."""
        cache = self.cached(dataset, split, with_targets)
        return (dataset, None) if cache is None else (cache, 0)
