"""The Lightning-style wrapper between a pure model and the trainers.

A modeler owns what the algorithm needs around the network: moving batches to the device, the loss,
one optimisation step, anomaly maps and scores, optimisers, and checkpoints. Subclasses override only
what differs; every family-independent step lives here so sibling modelers never copy each other.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from anomaly_framework.execution.distributed import all_finite
from anomaly_framework.metrics.metrics_base import compute_image_metrics, compute_pixel_metrics
from anomaly_framework.modelers.modeler_tiling import TilingMixin
from anomaly_framework.ops.filters import gaussian_blur2d, upsample_maps
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import StageTimer


class NonFiniteLossError(FrameworkError):
    """Raised when a loss becomes NaN or infinite, so training stops instead of silently diverging."""


def as_batch(inputs: dict | torch.Tensor) -> dict:
    """A batch dict; bare images [B, 3, H, W] (a notebook's tensor) become ``{"image": images}``."""
    return {"image": inputs} if isinstance(inputs, torch.Tensor) else inputs


def _parts(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss's named parts (DRAEM's focal and SSIM terms, a VAE's KL...) as floats, the total left out."""
    return {name: float(value.detach()) for name, value in losses.items() if name != "loss"}


@contextlib.contextmanager
def observed_training_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in training mode for a pass that must leave no trace: layers keeping running statistics
    (batch norm) normalise with them and do not update them, and the random states (VAE sampling draws
    from them, and the next epoch's shuffle would follow) are restored afterwards, as is the mode.

    Held-out images thus never move batch-norm statistics, and training continues exactly as if the
    pass had not happened. Frozen backbones stay in eval mode (``TimmFeatureExtractor.train``).
    """
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        for module in model.modules():
            if getattr(module, "track_running_stats", False):
                module.eval()
        try:
            yield
        finally:
            model.train(was_training)


class BaseModeler(TilingMixin):
    """Wraps ``model`` (a pure nn.Module) with the steps every trainer calls.

    Args:
        model: the pure algorithm.
        loss_fn: ``loss_fn(outputs, batch)`` -> scalar (or ``{"loss": scalar, ...parts}``); replaces the
            modeler's own ``compute_loss`` when given.
        metrics: family metrics (``compute_train_metrics`` / ``compute_valid_metrics`` /
            ``compute_test_metrics``); the trainer attaches its family's when None.
        device: where the model runs; the trainer moves it to its own device anyway.
        config: the resolved config (optimiser settings...); the trainer gives its own when None.

    Attributes:
        one_pass: True for memory models, which collect statistics in ``training_step`` without an
            optimiser and build their buffers in ``fit``; False for gradient-trained models.
        timer: stage timings (``features``, ``maps``...) that benchmarks and results report.
    """

    one_pass = False
    fit_stage = "fit_buffers"  # name of the buffer-building stage in timings

    def __init__(self, model: nn.Module, loss_fn: Callable | None = None, metrics: Any = None,
                 device: torch.device | str | None = None, config: dict | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.metrics = metrics
        self.config = config
        self.device = torch.device("cpu")
        self.timer = StageTimer()
        self.use_amp = False
        self.network: nn.Module = model  # what training steps call: the model, or its DDP wrapper under torchrun
        if device is not None:
            self.to(torch.device(device))

    # -- device and modes -------------------------------------------------------------------------
    def to(self, device: torch.device) -> "BaseModeler":
        self.device = device
        self.timer = StageTimer(device)
        self.model.to(device)
        self.use_amp = device.type == "cuda"
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on CUDA only; CPU runs stay in float32 so results are exact and comparable."""
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def run_model(self, inputs: torch.Tensor | list[torch.Tensor]) -> Any:
        """Optimiser steps go through ``network`` (DDP synchronises gradients); validation and evaluation,
        which compute no gradient, use the bare model."""
        return (self.network if self.model.training and torch.is_grad_enabled() else self.model)(inputs)

    def images(self, batch: dict) -> torch.Tensor | list[torch.Tensor]:
        """The batch's images on the modeler's device [B, 3, H, W] (``data.image_size=native``: a list of [3, H, W])."""
        if isinstance(batch["image"], list):
            return [image.to(self.device, non_blocking=True) for image in batch["image"]]
        return batch["image"].to(self.device, non_blocking=True)

    def inputs(self, batch: dict) -> torch.Tensor | list[torch.Tensor]:
        """What the model runs on: the images, or the frozen backbone's features when a trainer cached them;
        tiled (``data.tile_size``), those of every tile of the batch."""
        if self.tiling is not None and not batch.get("tiles"):
            batch = self.all_tiles(batch)
        if "features" in batch:
            return [feature.to(self.device, non_blocking=True) for feature in batch["features"]]
        return self.images(batch)

    def input_size(self, batch: dict) -> tuple[int, int]:
        """The input images' side, also for batches of cached features (the configured size, or the tile's)."""
        if "image" in batch:
            return tuple(batch["image"].shape[-2:])
        return (self.tiling[0] if batch.get("tiles") else self.config["data"]["image_size"],) * 2

    # -- the seed's step methods ------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Any]:
        """Runs the model on the batch's images (or their cached backbone features)."""
        with self.timer("features"):
            return self.run_model(self.inputs(batch))

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The training objective: ``{"loss": scalar, ...parts}``. Gradient models must override."""
        raise NotImplementedError(f"{type(self).__name__} has no loss: it is a one-pass model")

    def loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """``loss_fn`` when one was given, else the modeler's own ``compute_loss``."""
        if self.loss_fn is None:
            return self.compute_loss(outputs, batch)
        value = self.loss_fn(outputs, batch)
        return value if isinstance(value, dict) else {"loss": value}

    def training_step(self, inputs: dict | torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """One optimiser step: ``{"loss": float, "train_metrics": {loss parts, family metrics}}``.

        One-pass models collect the batch instead and return ``{"train_metrics": {}}``.
        """
        batch = as_batch(inputs)
        if self.one_pass:
            with torch.inference_mode(), self.timer("features"):
                for part in self.tile_batches(batch):  # tiled: a backbone batch of tiles at a time
                    self.model.update(self.inputs(part))
            return {"train_metrics": {}}
        self.model.train()
        with self.autocast():
            outputs = self.forward(batch)
            losses = self.loss(outputs, batch)
        loss = losses["loss"]
        if not all_finite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} (on this or another rank)")
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss, optimizer)
        return {"loss": float(loss.detach()),
                "train_metrics": {**_parts(losses), **self.compute_train_metrics(outputs, batch)}}

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Back-propagates and steps; the trainer may attach a GradScaler for mixed precision."""
        scaler = getattr(self, "scaler", None)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def validate_step(self, inputs: dict | torch.Tensor) -> dict:
        """The training computation without back-propagation, on held-out normal images:
        ``{"val_loss": float, "val_metrics": {loss parts, family metrics}}``.

        As the design says, the model is in training mode (sampled VAE latents, any dropout), except that
        batch norm uses its running statistics: held-out images must not move them, and the kept epoch
        should be judged as it will be evaluated. Random states are put back (``observed_training_mode``).
        """
        batch = as_batch(inputs)
        with observed_training_mode(self.model, self.device), self.autocast():
            outputs = self.forward(batch)
            losses = self.loss(outputs, batch)
        return {"val_loss": float(losses["loss"]),
                "val_metrics": {**_parts(losses), **self.compute_valid_metrics(outputs, batch)}}

    # -- metrics, split by stage ------------------------------------------------------------------
    def _family_metrics(self, name: str, *args: Any) -> dict:
        compute = getattr(self.metrics, name, None)
        return compute(*args) if compute is not None else {}

    def compute_train_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        """The family's metrics of one training batch (PSNR/SSIM, likelihood...), {} where it has none."""
        return self._family_metrics("compute_train_metrics", outputs, batch)

    def compute_valid_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        """The family's metrics of one validation batch."""
        return self._family_metrics("compute_valid_metrics", outputs, batch)

    def compute_test_metrics(self, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
                             maps: np.ndarray | None, threshold: float | None, threshold_source: str) -> dict:
        """Metrics of the whole test split: image metrics at ``threshold``, pixel metrics where masks
        [N, 1, S, S] exist (None otherwise), then the family's own."""
        metrics = compute_image_metrics(labels, scores, threshold, threshold_source)
        if masks is not None:
            metrics.update(compute_pixel_metrics(masks, maps))
        else:
            metrics.update({"pixel_auroc": None, "pixel_aupr": None, "aupro": None})
        metrics.update(self._family_metrics("compute_test_metrics", labels, scores, masks, maps))
        return metrics

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate_step(self, inputs: dict | torch.Tensor, held_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Anomaly maps [B, 1, H, W] at the input resolution (``data.image_size=native``: a list of each
        image's [1, H, W]) and image scores [B].

        ``held_out`` [B]: the batch is the fit's own images at these positions; a memory model then
        scores each as if fitted without it (``model.leave_one_out``), for an unbiased threshold.
        """
        batch = as_batch(inputs)
        self.model.eval()
        if self.tiling is not None and not batch.get("tiles"):
            return self.evaluate_tiled(batch, held_out)
        if held_out is None:
            outputs = self.forward(batch)
        else:
            with self.timer("features"):
                outputs = self.model.leave_one_out(self.inputs(batch), held_out)
        with self.timer("maps"):
            maps = self.maps_from_outputs(outputs, batch).float()
            scores = self.scores_from_maps(maps, outputs)
        return {"anomaly_maps": maps, "anomaly_scores": scores}

    def compute_anomaly_maps(self, inputs: dict | torch.Tensor) -> torch.Tensor:
        """The design's call: maps [B, 1, H, W] of a batch (or of images [B, 3, H, W])."""
        return self.evaluate_step(inputs)["anomaly_maps"]

    def compute_anomaly_scores(self, inputs: dict | torch.Tensor) -> torch.Tensor:
        """The design's call: image scores [B] of a batch (or of images [B, 3, H, W])."""
        return self.evaluate_step(inputs)["anomaly_scores"]

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        """Each model turns its outputs into a map [B, 1, H, W] (the hook modelers override)."""
        raise NotImplementedError

    def selection_maps(self, batch: dict) -> torch.Tensor:
        """The maps whose mean over held-out normal images ``train.monitor=normal_map_mean`` minimises."""
        return self.evaluate_step(batch)["anomaly_maps"]

    def scores_from_maps(self, maps: torch.Tensor, outputs: dict) -> torch.Tensor:
        """Image score = maximum of the map, unless a model defines otherwise."""
        return maps.amax(dim=(1, 2, 3))

    def begin_fit(self, num_images: int, num_tiles: int | None = None) -> None:
        """Tells a one-pass model how many training images (tiled: tiles, which ``num_tiles`` counts where
        images differ in size) will come (PatchCore preallocates)."""
        if self.one_pass:
            self.model.begin_fit(num_tiles if num_tiles is not None else num_images * self.tiles_per_image())

    def set_epoch_length(self, batches: int) -> None:
        """Tells a modeler whose learning rate changes per batch (CFlow's warm-up) how many batches an
        epoch has; the others ignore it."""

    def fit(self) -> None:
        """One-pass models build their buffers from what ``training_step`` collected."""
        if self.one_pass:
            with self.timer(self.fit_stage):
                self.model.finalize()

    # -- shared post-processing -------------------------------------------------------------------
    @staticmethod
    def smooth_to_input(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float, mode: str = "bilinear"):
        """Upsamples a patch-grid map [B, 1, h, w] to the input size, then Gaussian-smooths it."""
        return gaussian_blur2d(upsample_maps(patch_maps, size, mode=mode), sigma)

    # -- optimisation -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self, num_epochs: int | None = None) -> tuple[torch.optim.Optimizer, Any]:
        """Optimiser and scheduler from the config's ``train`` section (plain torch classes); the schedule
        spans ``num_epochs`` (default ``train.epochs``)."""
        train = {**self.config["train"], **({"epochs": num_epochs} if num_epochs else {})}
        params = self.trainable_parameters()
        name = train["optimizer"]
        if name == "sgd":
            optimizer = torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
        elif name in ("adam", "adamw"):
            optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            optimizer = optimizer_class(params, lr=train["lr"], betas=tuple(train.get("betas", (0.9, 0.999))),
                                        weight_decay=train["weight_decay"])
        else:
            raise FrameworkError(f"Config key 'train.optimizer' must be sgd, adam or adamw, got {name!r}")
        return optimizer, self._scheduler(optimizer, train)

    @staticmethod
    def _scheduler(optimizer: torch.optim.Optimizer, train: dict):
        name = train["scheduler"]
        if name == "none":
            return None
        if name == "multistep":
            # A milestone of epoch 0 would lower the rate before the first step (a run of 1 epoch at 0.8·E):
            # the earliest decay is after the first epoch.
            milestones = [max(1, math.floor(fraction * train["epochs"])) for fraction in train["milestones"]]
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=train["gamma"])
        if name == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train["epochs"])
        raise FrameworkError(f"Config key 'train.scheduler' must be none, multistep or cosine, got {name!r}")

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state: parameters and every fitted buffer."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Loads the model's weights; a checkpoint of another model, config or version is one clear error."""
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise FrameworkError(f"'{source}' does not fit {type(self.model).__name__} (another model, config or an "
                                 f"older version of this framework; re-run to make a new one): {reason}") from error
