"""The trainer of models fitted by back-propagation on normal images (STFPM, AE, VAE).

Validation uses held-out *training* images (``data.val_fraction``), never the test set (P6, P10).
Early stopping watches ``train.monitor``: the validation loss, the mean anomaly map of those normal
images (STFPM's official rule), or the pixel AUROC on those images with simulated defects (a label-free
proxy for localisation, for models whose localisation peaks while their loss keeps falling, as
FastFlow's, P5). ``train.keep`` says which weights are evaluated: the best monitored epoch, or the last
one (FastFlow's and DRAEM's official codes, which hold nothing out). ``last.pt`` holds
everything needed to resume (model, optimiser, scheduler, epoch, RNG states, config), so an
interrupted run resumed with ``train.resume`` ends where an uninterrupted one would.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from anomaly_framework.dataloaders.anomaly_simulation import SimulatedDefectSet, TextureSource
from anomaly_framework.execution.distributed import broadcast_object, is_main, mean_over_ranks, world_size
from anomaly_framework.execution.interrupts import raise_if_interrupted
from anomaly_framework.metrics.metrics_base import auroc
from anomaly_framework.modelers.modeler_base import NonFiniteLossError
from anomaly_framework.registry import TRAINER_REGISTRY
from anomaly_framework.trainers.checkpoint_files import CHECKPOINT_NAME, read_checkpoint, save_atomically
from anomaly_framework.trainers.trainer_base import BaseTrainer
from anomaly_framework.trainers.training_log import TrainingLog
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import StageTimer

LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def rng_state() -> dict:
    """Every random state that shapes training, as tensors and ints (``weights_only``-loadable)."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_size_of(loader: DataLoader | None) -> int | None:
    """A given loader's batch size, kept when the trainer re-batches its images (None: ``data.batch_size``)."""
    return loader.batch_size if loader is not None else None


@TRAINER_REGISTRY.register("gradient")
class GradientTrainer(BaseTrainer):
    """Epochs of optimiser steps, validation on held-out normal images, early stopping, resume, NaN guard."""

    drop_last = False

    def training_loader(self, dataset, num_workers: int | None = None, batch_size: int | None = None) -> DataLoader:
        """Shuffled batches of ``dataset``; under torchrun a DistributedSampler gives each rank its share
        of every global batch (``batch_size``, default ``data.batch_size``, images in all, split over the ranks)."""
        batch_size = batch_size or self.config["data"]["batch_size"]
        if world_size() == 1:
            return self.dataloader.make_loader(dataset, shuffle=True, drop_last=self.drop_last, num_workers=num_workers,
                                               batch_size=batch_size)
        sampler = DistributedSampler(dataset, shuffle=True, seed=self.config["seed"], drop_last=self.drop_last)
        per_rank = max(1, batch_size // world_size())
        return self.dataloader.make_loader(dataset, shuffle=False, drop_last=self.drop_last, sampler=sampler,
                                           batch_size=per_rank, num_workers=num_workers)

    def split_dataset(self, dataset: Dataset, split: str, with_targets: bool = False) -> tuple[Dataset, int | None]:
        """What a loader of ``split`` iterates, and its worker count (None = ``data.num_workers``). The flow
        trainer swaps in the split's cached backbone features (with the labels and masks when
        ``with_targets``)."""
        return dataset, None

    def train_loader(self, loader: DataLoader | None = None) -> DataLoader:
        """Training batches of ``loader``'s images at its batch size (default the train split); DRAEM's
        trainer wraps the dataset with anomaly simulation here."""
        source = loader.dataset if loader is not None else self.dataloader.train_dataset
        dataset, workers = self.split_dataset(source, "train")
        return self.training_loader(dataset, num_workers=workers, batch_size=batch_size_of(loader))

    def valid_loader(self, loader: DataLoader | None = None) -> DataLoader | None:
        """Validation batches of ``loader``'s images (default held-out train/good, None when
        ``data.val_fraction`` is 0)."""
        source = loader.dataset if loader is not None else self.dataloader.valid_dataset
        if source is None:
            return None
        dataset, workers = self.split_dataset(source, "valid")
        return self.dataloader.make_loader(dataset, shuffle=False, num_workers=workers,
                                           batch_size=batch_size_of(loader))

    def simulated_defects(self, dataset: Dataset | None = None) -> SimulatedDefectSet:
        """Held-out images (default the valid split) with fixed simulated defects (textures from
        ``train.texture_root``, or Perlin)."""
        dataset = dataset if dataset is not None else self.dataloader.valid_dataset
        if dataset is None:
            raise FrameworkError("train.monitor=synthetic_pixel_auroc needs held-out training images: "
                                 "set data.val_fraction > 0")
        textures = TextureSource(self.config["train"]["texture_root"], self.config["data"]["image_size"], warn=False)
        return SimulatedDefectSet(dataset, textures, seed=self.config["seed"])

    def defect_loader(self, valid_loader: DataLoader | None = None) -> DataLoader | None:
        """Batches of ``simulated_defects`` of ``valid_loader``'s images when ``train.monitor`` asks for them,
        else None."""
        if self.config["train"]["monitor"] != "synthetic_pixel_auroc":
            return None
        held_out = self.simulated_defects(valid_loader.dataset if valid_loader is not None else None)
        dataset, workers = self.split_dataset(held_out, "simulated-defect", with_targets=True)
        return self.dataloader.make_loader(dataset, shuffle=False, num_workers=workers)

    def synthetic_pixel_auroc(self, loader: DataLoader) -> float:
        """Pixel AUROC of the current weights on the simulated defects; leaves every RNG as it was."""
        with torch.random.fork_rng(devices=[]):
            predictions = self.predict(loader, desc="simulated defects")
        return auroc(predictions.masks.flatten().numpy() > 0.5, predictions.maps.flatten().numpy(),
                     "synthetic pixel AUROC")

    @torch.no_grad()
    def normal_map_mean(self, loader: DataLoader) -> float:
        """Mean of the model's selection maps over every pixel of the held-out normal images."""
        total, count = 0.0, 0
        for batch in loader:
            maps = self.modeler.selection_maps(batch)
            for part in maps if isinstance(maps, list) else [maps]:  # native size: one map per image
                total, count = total + float(part.float().sum()), count + part.numel()
        return total / max(count, 1)

    def monitored_value(self, train_metrics: dict, valid_metrics: dict, valid_loader, defect_loader) -> float:
        """What early stopping minimises: the validation loss, the mean normal map, or minus the synthetic
        pixel AUROC (the last two are also recorded in ``valid_metrics``)."""
        if self.config["train"]["monitor"] == "normal_map_mean":
            if valid_loader is None:
                raise FrameworkError("train.monitor=normal_map_mean needs held-out training images: "
                                     "set data.val_fraction > 0")
            valid_metrics["normal_map_mean"] = self.normal_map_mean(valid_loader)
            return valid_metrics["normal_map_mean"]
        if defect_loader is None:
            return valid_metrics.get("loss", train_metrics["loss"])
        valid_metrics["synthetic_pixel_auroc"] = self.synthetic_pixel_auroc(defect_loader)
        return -valid_metrics["synthetic_pixel_auroc"]

    def run_epoch(self, data_loader: DataLoader, epoch: int = 1, num_epochs: int = 1,
                  mode: str = "train") -> dict[str, float]:
        if mode not in ("train", "valid"):
            raise FrameworkError(f"run_epoch mode must be 'train' or 'valid', got {mode!r}")
        train = mode == "train"
        if train and getattr(self, "optimizer", None) is None:  # an epoch run by hand, before any fit
            self.optimizer, self.scheduler = self.modeler.configure_optimizers(num_epochs)
        totals: dict[str, float] = {}
        count = 0
        desc = f"epoch {epoch}/{num_epochs}" if train else "validate"
        bar = tqdm(data_loader, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main())
        for step, batch in enumerate(bar):
            raise_if_interrupted()
            try:
                report = self.modeler.training_step(batch, self.optimizer) if train else self.modeler.validate_step(batch)
            except NonFiniteLossError as error:
                kept = self.run_dir / LAST_NAME
                raise FrameworkError(
                    f"Training stopped at epoch {epoch}, step {step + 1}: {error}; "
                    f"the last good checkpoint is kept at '{kept}' (lower train.lr?)"
                ) from error
            self.steps_done = step + 1 if train else self.steps_done
            loss, metrics = ((report["loss"], report["train_metrics"]) if train
                             else (report["val_loss"], report["val_metrics"]))
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            bar.set_postfix(loss=f"{loss:.4g}")
        return {key: value / max(count, 1) for key, value in totals.items()}

    # -- checkpoints of the training state ----------------------------------------------------------
    def progress(self) -> str:
        epochs = getattr(self, "num_epochs", self.config["train"]["epochs"])
        if self.timings.get("fit") is not None:
            return f"while evaluating, after training ({len(self.history)} epochs in last.pt)"
        if not hasattr(self, "steps_done"):
            return "before the first epoch"
        done = len(self.history)
        saved = f"last.pt holds {done} completed epoch{'s' * (done != 1)}" if done else "before any epoch completed"
        return f"in epoch {self.epoch + 1}/{epochs} after {self.steps_done} training steps; {saved}"

    def resumable(self) -> bool:
        return (self.run_dir / LAST_NAME).is_file()

    def finish(self, checkpoint_saved: bool) -> None:
        """Keeps the weights once: checkpoint.pt holds the best epoch, so best.pt goes; last.pt (weights,
        optimiser state) goes too unless ``train.keep_training_state``. Only what this run wrote is removed."""
        if checkpoint_saved:
            (self.run_dir / BEST_NAME).unlink(missing_ok=True)
        if not self.config["train"]["keep_training_state"]:
            (self.run_dir / LAST_NAME).unlink(missing_ok=True)

    def _training_state(self) -> dict:
        return {
            **self.checkpoint(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch + 1,
            "best_monitored": self.best_monitored,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "rng": rng_state(),
        }

    def _resume(self, run_dir: Path) -> None:
        path = Path(run_dir) / LAST_NAME
        if not path.is_file():
            raise FrameworkError(f"Cannot resume: '{path}' not found (train.resume must be a run folder with last.pt)")
        state = read_checkpoint(path, self.device, needs=("model", "optimizer"))
        self.modeler.load_state_dict(state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.start_epoch, self.best_monitored = state["epoch"], state["best_monitored"]
            self.bad_epochs, self.history, rng = state["bad_epochs"], state["history"], state["rng"]
        except KeyError as error:
            raise FrameworkError(f"Cannot resume from '{path}': it lacks {error} (written by an older version "
                                 f"of this framework; start a new run)") from error
        self.best_epoch = state.get("best_epoch")
        set_rng_state(rng)
        # The best epoch may precede the interruption; this run's folder must hold it for evaluation. A run
        # that finished keeps it in checkpoint.pt (best.pt is dropped then). A run resumed in its own folder
        # already holds it there.
        for best in (Path(run_dir) / BEST_NAME, Path(run_dir) / CHECKPOINT_NAME):
            if best.resolve() == (self.run_dir / BEST_NAME).resolve():
                break
            if is_main() and best.is_file():
                shutil.copy2(best, self.run_dir / BEST_NAME)
                break

    def monitored_name(self, valid_loader, defect_loader) -> str:
        if self.config["train"]["monitor"] == "normal_map_mean":
            return "mean anomaly map of the held-out train images"
        if defect_loader is not None:
            return "minus the synthetic pixel AUROC on held-out train images"
        if valid_loader:
            return "valid loss"
        return "train loss (no validation images: data.val_fraction is 0 or fit got no valid_loader)"

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, train_loader: DataLoader | None = None, num_epochs: int | None = None,
            valid_loader: DataLoader | None = None) -> dict:
        train_loader, num_epochs, valid_loader = self.fit_arguments(train_loader, num_epochs, valid_loader)
        self.num_epochs = num_epochs
        train_cfg = self.config["train"]
        self.optimizer, self.scheduler = self.modeler.configure_optimizers(num_epochs)
        if self.modeler.use_amp:
            self.modeler.scaler = torch.amp.GradScaler("cuda")
        self.start_epoch, self.best_monitored, self.bad_epochs, self.history = 0, math.inf, 0, []
        self.best_epoch: int | None = None
        keep_best = train_cfg["keep"] == "best"
        if train_cfg["resume"]:
            self._resume(Path(train_cfg["resume"]))
        if world_size() > 1:
            self.modeler.network = DistributedDataParallel(
                self.modeler.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.modeler.timer = StageTimer(self.device)
        start = time.perf_counter()
        held_out = valid_loader
        train_loader = self.train_loader(train_loader)
        valid_loader = self.valid_loader(held_out) if held_out is not None else None
        defect_loader = self.defect_loader(held_out)
        stopped_early = False
        log = TrainingLog(self.run_dir, train_cfg["tensorboard"]) if is_main() else None
        self.epoch = self.start_epoch
        for self.epoch in range(self.start_epoch, num_epochs):
            self.steps_done = 0
            epoch_start, lr = time.perf_counter(), self.optimizer.param_groups[0]["lr"]
            for epoch_aware in (train_loader.dataset, train_loader.sampler):
                if hasattr(epoch_aware, "set_epoch"):
                    epoch_aware.set_epoch(self.epoch)
            train_metrics = self.run_epoch(train_loader, self.epoch + 1, num_epochs, "train")
            train_metrics = {key: mean_over_ranks(value, self.device) for key, value in train_metrics.items()}
            valid_metrics = self.run_epoch(valid_loader, self.epoch + 1, num_epochs, "valid") if valid_loader else {}
            if self.scheduler is not None:
                self.scheduler.step()
            # Every rank validates the same images with the same weights; rank 0's value decides for all.
            monitored = broadcast_object(self.monitored_value(train_metrics, valid_metrics, valid_loader, defect_loader))
            self.history.append({"epoch": self.epoch + 1, "train": train_metrics, "valid": valid_metrics, "lr": lr,
                                 "seconds": time.perf_counter() - epoch_start})
            if monitored < self.best_monitored - train_cfg["min_delta"]:
                self.best_monitored, self.bad_epochs, self.best_epoch = monitored, 0, self.epoch + 1
                if is_main() and keep_best:
                    save_atomically(self.checkpoint(), self.run_dir / BEST_NAME)
            else:
                self.bad_epochs += 1
            if is_main():
                save_atomically(self._training_state(), self.run_dir / LAST_NAME)
                log.record(self.history)
                tqdm.write(f"epoch {self.epoch + 1}: train loss {train_metrics['loss']:.5g}"
                           + (f", valid loss {valid_metrics['loss']:.5g}" if valid_metrics else "")
                           + (f", synthetic pixel AUROC {-monitored:.4f}" if defect_loader else "")
                           + (f", normal map mean {monitored:.5g}" if "normal_map_mean" in valid_metrics else ""))
            if self.bad_epochs >= train_cfg["patience"]:
                stopped_early = True
                break
        self.modeler.network = self.modeler.model
        if is_main():  # the only rank that evaluates; keep=last evaluates the weights as they are
            log.close(self.history)
            if keep_best:
                best = read_checkpoint(self.run_dir / BEST_NAME, self.device)
                self.modeler.load_state_dict(best["model"])
        self.timings.update(self.modeler.timer.as_dict("fit_"))
        self.timings["fit"] = time.perf_counter() - start
        return {
            "epochs": len(self.history),
            "stopped_early": stopped_early,
            "best_monitored": self.best_monitored,
            "best_epoch": self.best_epoch,
            "monitored": self.monitored_name(valid_loader, defect_loader),
            "kept": f"epoch {self.best_epoch} (best monitored)" if keep_best else f"epoch {len(self.history)} (last)",
            "history": self.history,
        }
