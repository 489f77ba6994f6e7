"""CFlow-AD's modeler: optimiser steps on random fiber batches, its learning-rate schedule, and its map.

The official training loop (gudovskiy/cflow-ad train.py) runs, for each batch of images and each
level in turn, optimiser steps on batches of N = 256 fibers drawn without replacement from a random
permutation of that level's B·H·W fibers (the last E mod N are left out). Our epoch is its sub-epoch;
``train.sub_epochs`` of them make one meta-epoch, whose learning rate follows a cosine from lr to
lr·0.1³ over the meta-epochs, with a linear warm-up per image batch from lr/10 over the first
``train.warmup_meta_epochs`` (utils.adjust_learning_rate / warmup_learning_rate).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from anomaly_framework.errors import FrameworkError
from anomaly_framework.execution.distributed import all_finite, world_size
from anomaly_framework.modelers.modeler_base import BaseModeler, NonFiniteLossError, as_batch
from anomaly_framework.registry import MODELER_REGISTRY

COSINE_DECAY = 0.1 ** 3  # eta_min = lr · lr_decay_rate³ (lr_decay_rate 0.1)


class MetaEpochSchedule:
    """The official learning rate per (epoch, image batch); ``step()`` ends an epoch (the trainer's call),
    ``batch_step()`` sets the rate for the next image batch (the modeler's call)."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, epochs: int, sub_epochs: int,
                 warmup_meta_epochs: int) -> None:
        self.optimizer, self.lr, self.sub_epochs, self.warmup = optimizer, lr, sub_epochs, warmup_meta_epochs
        self.meta_epochs = max(1, math.ceil(epochs / sub_epochs))
        self.epoch, self.batch, self.batches_per_epoch = 0, 0, 1
        self._apply(self.cosine(0))

    def cosine(self, meta_epoch: int) -> float:
        eta_min = self.lr * COSINE_DECAY
        return eta_min + (self.lr - eta_min) * (1 + math.cos(math.pi * meta_epoch / self.meta_epochs)) / 2

    def lr_at(self, epoch: int, batch: int) -> float:
        """The rate of image batch ``batch`` (0-based) of epoch ``epoch`` (0-based)."""
        meta, sub = divmod(epoch, self.sub_epochs)
        if meta >= self.warmup:
            return self.cosine(meta)
        per_meta = self.batches_per_epoch * self.sub_epochs
        # at most 1: an epoch run by hand (trainer.run_epoch without fit) may exceed the announced length
        progress = min(1.0, (batch + sub * self.batches_per_epoch + meta * per_meta) / (self.warmup * per_meta))
        start = self.lr / 10.0
        return start + progress * (self.cosine(self.warmup) - start)

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def batch_step(self) -> None:
        self._apply(self.lr_at(self.epoch, self.batch))
        self.batch += 1

    def step(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self._apply(self.cosine(self.epoch // self.sub_epochs))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], 0
        self._apply(self.cosine(self.epoch // self.sub_epochs))


@MODELER_REGISTRY.register("cflow")
class CflowModeler(BaseModeler):
    """Trains the flows on fiber batches; the encoder stays frozen."""

    schedule: MetaEpochSchedule | None = None
    batches_per_epoch = 1
    _max_epoch: int | None = None

    def _scheduler(self, optimizer: torch.optim.Optimizer, train: dict):
        if train["scheduler"] != "cflow":
            self.schedule = None
            return BaseModeler._scheduler(optimizer, train)
        self.schedule = MetaEpochSchedule(optimizer, train["lr"], train["epochs"], train["sub_epochs"],
                                          train["warmup_meta_epochs"])
        self.schedule.batches_per_epoch = self.batches_per_epoch
        return self.schedule

    def set_epoch_length(self, batches: int) -> None:
        self.batches_per_epoch = max(1, batches)
        if self.schedule is not None:
            self.schedule.batches_per_epoch = self.batches_per_epoch

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The mean fiber loss over every fiber of every level (the official test loss)."""
        log_prob = torch.cat([level.flatten() for level in outputs["log_prob"]])
        return {"loss": self.model.fiber_loss(log_prob).mean(), "log_likelihood_per_dim": log_prob.mean()}

    def _track_maximum(self, level: int, log_prob: torch.Tensor) -> None:
        """The running maximum of this epoch's fiber log-likelihoods per level (reset each epoch)."""
        epoch = self.schedule.epoch if self.schedule is not None else 0
        if epoch != self._max_epoch:
            self._max_epoch = epoch
            self.model.log_prob_max.fill_(-math.inf)
        self.model.log_prob_max[level] = torch.maximum(self.model.log_prob_max[level], log_prob.detach().amax())

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, level: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        if world_size() == 1:
            self.backward(loss, optimizer)
            return
        loss.backward()  # each rank's fibers; gradients averaged as DDP would (only this level's flow has any)
        for parameter in self.model.flows[level].parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size()
        optimizer.step()

    def training_step(self, inputs, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """One image batch: per level, optimiser steps on shuffled batches of ``model.fiber_batch`` fibers."""
        batch = as_batch(inputs)
        self.model.train()
        if self.schedule is not None:
            self.schedule.batch_step()
        with self.timer("features"):
            features = self.inputs(batch)
            if isinstance(features, torch.Tensor):
                features = self.model.extract(self.model.augment(features) if self.model.augments_training else features)
        size = self.model.fiber_batch
        total, log_likelihood, count = 0.0, 0.0, 0
        for level, feature in enumerate(features):
            channels, fibers_count = feature.shape[1], feature.shape[0] * feature.shape[2] * feature.shape[3]
            if fibers_count < size:
                raise FrameworkError(f"CFlow level {level} has {fibers_count} fibers per batch, fewer than "
                                     f"model.fiber_batch={size}: raise data.batch_size or lower model.fiber_batch")
            fibers = feature.permute(0, 2, 3, 1).reshape(fibers_count, channels)
            conditions = self.model.conditions(feature).permute(0, 2, 3, 1).reshape(fibers_count, -1)
            order = torch.randperm(fibers_count).to(feature.device)
            for start in range(0, fibers_count // size * size, size):
                chosen = order[start:start + size]
                with self.autocast():
                    log_prob = self.model.level_log_prob(level, fibers[chosen], conditions[chosen])
                    loss = self.model.fiber_loss(log_prob)
                if not all_finite(loss.mean()):
                    raise NonFiniteLossError(f"loss became {loss.mean().item()} (on this or another rank)")
                self._step(loss.mean(), optimizer, level)
                self._track_maximum(level, log_prob)
                total += float(loss.detach().sum())
                log_likelihood += float(log_prob.detach().sum())
                count += size
        return {"loss": total / count, "train_metrics": {"log_likelihood_per_dim": log_likelihood / count}}

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        """At the input size, normalised by the fitted per-level maxima (see ``CflowModel.anomaly_map``)."""
        return self.model.anomaly_map(outputs, self.input_size(batch), level_max=self.model.log_prob_max.unbind(),
                                      shift=float(len(outputs["log_prob"])))
