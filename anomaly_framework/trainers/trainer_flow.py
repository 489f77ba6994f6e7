"""The trainer of normalizing-flow models (FastFlow): the gradient trainer's machinery, full batches only.

FastFlow's reference drops the last incomplete batch, whose noisier log-likelihood estimate would
otherwise weigh as much as a full one. The backbone is frozen and training has no augmentation, so each
image's backbone features are the same in every epoch: they are computed once and kept on the device
(``train.feature_cache_mb``, see ``feature_cache``), which leaves only the flows to run per epoch.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from anomaly_framework.registry import TRAINER_REGISTRY
from anomaly_framework.trainers.feature_cache import FeatureCacheMixin
from anomaly_framework.trainers.trainer_gradient import GradientTrainer


@TRAINER_REGISTRY.register("flow")
class FlowTrainer(FeatureCacheMixin, GradientTrainer):
    """Early stopping on held-out normal images' loss, resume and NaN guard, as the gradient trainer."""

    drop_last = True

    def split_dataset(self, dataset, split: str, with_targets: bool = False):
        """Cached features, but images for the training split of a model that augments it (CFlow's rotation)."""
        if split == "train" and getattr(self.modeler.model, "augments_training", False):
            return dataset, None
        return super().split_dataset(dataset, split, with_targets)

    def train_loader(self, loader: DataLoader | None = None) -> DataLoader:
        """The gradient trainer's, with its length told to the modeler (CFlow's per-batch warm-up)."""
        loader = super().train_loader(loader)
        self.modeler.set_epoch_length(len(loader))
        return loader
