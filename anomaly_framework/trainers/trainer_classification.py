"""The trainer of models that learn to separate normal from simulated-anomalous pixels (DRAEM).

The gradient trainer's machinery (epochs, held-out validation, early stopping, resume, NaN guard) with
one difference: training and validation images pass through the anomaly simulation first. Validation
images get one fixed draw of simulated anomalies (epoch 0), so their loss is comparable across epochs;
they are held-out *training* images, never the test set.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from anomaly_framework.dataloaders.anomaly_simulation import DraemTrainingDataset, TextureSource
from anomaly_framework.registry import TRAINER_REGISTRY
from anomaly_framework.trainers.trainer_gradient import GradientTrainer, batch_size_of


@TRAINER_REGISTRY.register("classification")
class ClassificationTrainer(GradientTrainer):
    """Supervised on simulated anomalies; ``train.texture_root`` (DTD layout) is the anomaly source."""

    def _simulated(self, dataset) -> DraemTrainingDataset:
        if not hasattr(self, "_textures"):
            self._textures = TextureSource(self.config["train"]["texture_root"], self.config["data"]["image_size"])
        return DraemTrainingDataset(dataset, self._textures, seed=self.config["seed"])

    def train_loader(self, loader: DataLoader | None = None) -> DataLoader:
        source = loader.dataset if loader is not None else self.dataloader.train_dataset
        return self.training_loader(self._simulated(source), batch_size=batch_size_of(loader))

    def valid_loader(self, loader: DataLoader | None = None) -> DataLoader | None:
        source = loader.dataset if loader is not None else self.dataloader.valid_dataset
        if source is None:
            return None
        return self.dataloader.make_loader(self._simulated(source), shuffle=False,
                                           batch_size=batch_size_of(loader))
