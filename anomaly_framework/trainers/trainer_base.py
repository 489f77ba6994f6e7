"""What every trainer does: predict maps and scores over a loader, pick a threshold, evaluate, checkpoint.

Families differ only in ``fit`` (one pass for memory models; epochs, validation and early stopping
for the gradient-style ones), so evaluation is written once here.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomaly_framework.execution.interrupts import raise_if_interrupted
from anomaly_framework.trainers.checkpoint_files import CHECKPOINT_NAME, save_atomically
from anomaly_framework.metrics.false_alarms import budget_threshold
from anomaly_framework.metrics.metrics_base import f1_adaptive_threshold, f1_max, normal_threshold
from anomaly_framework.backbones.extractors import weights_record
from anomaly_framework.ops.filters import upsample_maps
from anomaly_framework.ops.ragged import flat, joined, map_maxima
from anomaly_framework.reporting.predictions import score_scale
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import StageTimer

@dataclass
class Predictions:
    """Everything evaluation needs, on the CPU: scores [N], maps and masks [N, 1, S, S] at the model input
    (``data.image_size=native``: lists of each image's [1, H, W]), labels [N]; with ``ground_truth``, the maps
    and original masks at the evaluation resolution (one [h, w] pair per image, sizes may differ)."""

    scores: torch.Tensor
    maps: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor
    masks: torch.Tensor | list[torch.Tensor]
    image_paths: list[str]
    defect_types: list[str]
    eval_maps: list[np.ndarray] | None = None
    eval_masks: list[np.ndarray] | None = None

    def pixel_pairs(self) -> tuple:
        """(masks, maps) for the pixel metrics: at the evaluation resolution when one was set."""
        if self.eval_maps is not None:
            return self.eval_masks, self.eval_maps
        return self.masks.numpy(), self.maps.numpy()

    @classmethod
    def concatenate(cls, parts: list["Predictions"]) -> "Predictions":
        """The predictions of several passes (cross-fitting's folds) as one, in the order given."""
        def field(name: str):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else joined(values)
        return cls(**{name: field(name) for name in cls.__dataclass_fields__})

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Unpacks as ``scores, labels``, the design's ``predict`` return (as ``os.stat_result`` unpacks
        to its first ten fields and keeps the rest as attributes)."""
        return iter((self.scores, self.labels))


def evaluation_resolution(data_cfg: dict) -> int | str | None:
    """``data.mask_size`` when it asks for another resolution than the model input, else None; native at
    ``data.image_size=native`` (the model input is then each file's own size, its masks the original ones)."""
    if data_cfg["image_size"] == "native":
        return "native"
    size = data_cfg["mask_size"]
    return None if size is None or size == data_cfg["image_size"] else size


def describe_resolution(data_cfg: dict) -> str:
    """What results.json records as the pixel metrics' resolution."""
    size = evaluation_resolution(data_cfg)
    if size is None:
        return f"input {data_cfg['image_size']}x{data_cfg['image_size']} (masks resized by nearest neighbour as the images)"
    if data_cfg["image_size"] == "native":
        return "native (each file read at its own size, no resize or crop; maps at that size, original masks)"
    if size == "native":
        crop = "" if data_cfg["crop_ratio"] == 1.0 else ", its centre-crop region"
        return f"native (each original image's own size{crop}; map bilinearly upsampled, original masks)"
    return f"{size}x{size} (map bilinearly resized, original masks resized by nearest neighbour and cropped)"


@dataclass
class Evaluation:
    """What ``evaluate`` returns: read as the design's ``{"anomaly_maps", "anomaly_scores", "labels",
    "metrics"}`` (plus ``"predictions"``), and unpacks as ``metrics, predictions`` as before."""

    metrics: dict
    predictions: Predictions

    def keys(self) -> tuple[str, ...]:
        return ("anomaly_maps", "anomaly_scores", "labels", "metrics", "predictions")

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        design = {"anomaly_maps": "maps", "anomaly_scores": "scores", "labels": "labels"}
        return getattr(self.predictions, design[key]) if key in design else getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator:
        return iter((self.metrics, self.predictions))


class BaseTrainer:
    """Drives a modeler over the dataloader's splits.

    Args:
        modeler: the model wrapper (moved to ``device`` here).
        dataloader: a BaseDataloader giving train / valid / test loaders.
        config: the resolved config.
        run_dir: the run's own output folder.
        device: where the model runs.
        metrics: family metrics (PSNR/SSIM, likelihood...) reported during training, or None.
    """

    def __init__(self, modeler, dataloader, config: dict, run_dir: Path, device: torch.device, metrics=None) -> None:
        self.modeler = modeler.to(device)
        # What the modeler was built with wins (the design's ``BaseModeler(model, metrics=...)``).
        if getattr(self.modeler, "metrics", None) is None:
            self.modeler.metrics = metrics
        if getattr(self.modeler, "config", None) is None:
            self.modeler.config = config
        self.dataloader = dataloader
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # a notebook may name a folder not made yet
        self.device = device
        self.timings: dict[str, float] = {}
        self.threshold: float | None = None
        self.threshold_source = "none"
        dataloader.pin_memory = device.type == "cuda"  # host-to-device copies overlap the compute
        self.pixel_threshold: float | None = None  # the predicted masks' threshold on the maps
        self.pixel_threshold_source = "none"
        # How a false-alarm-budget threshold was chosen (budget, estimator, n, expected rate): results.json.
        self.threshold_calibration: dict | None = None
        self.pixel_threshold_calibration: dict | None = None
        self.score_scale: float | None = None  # of the normalised score (0.5 at the threshold), from normal scores

    # -- to be provided by each family --------------------------------------------------------------
    def fit(self, train_loader: DataLoader | None = None, num_epochs: int | None = None,
            valid_loader: DataLoader | None = None) -> dict:
        """Trains or fits the model; returns the fit record, whose ``history`` lists every epoch's
        ``{"epoch", "train", "valid"}`` means. Arguments as ``fit_arguments`` says."""
        raise NotImplementedError

    def run_epoch(self, data_loader: DataLoader, epoch: int = 1, num_epochs: int = 1,
                  mode: str = "train") -> dict[str, float]:
        """One pass over ``data_loader``: optimiser steps when ``mode`` is ``"train"``, validation steps when
        ``"valid"``; the mean of the loss and of each metric over the pass."""
        raise NotImplementedError

    def split_dataset(self, dataset, split: str, with_targets: bool = False) -> tuple:
        """What a loader of ``split`` iterates, and its worker count (None = ``data.num_workers``): the
        images here; trainers that cache frozen-backbone features swap in the split's features."""
        return dataset, None

    def eval_loader(self, dataset, split: str):
        """An unshuffled loader of ``split`` with its labels and masks, or None when the split is empty."""
        if dataset is None:
            return None
        dataset, workers = self.split_dataset(dataset, split, with_targets=True)
        return self.dataloader.make_loader(dataset, shuffle=False, num_workers=workers)

    def progress(self) -> str:
        """Where the run is, for the message of an interrupted run."""
        return "while evaluating" if self.timings.get("fit") is not None else "while fitting"

    def resumable(self) -> bool:
        """Whether the run folder holds a training state that ``train.resume`` can continue."""
        return False

    def finish(self, checkpoint_saved: bool) -> None:
        """Called once the run is done; families that keep training files drop what is no longer needed."""

    def fit_arguments(self, train_loader: DataLoader | None, num_epochs: int | None,
                      valid_loader: DataLoader | None) -> tuple[DataLoader, int, DataLoader | None]:
        """The design's ``fit(train_loader, num_epochs, valid_loader=None)`` and the bare ``fit()`` of
        ``run_experiment`` in one: without a ``train_loader`` the dataloader's own train and held-out
        splits are used; without ``num_epochs``, ``train.epochs``. Families take the images (the loader's
        dataset) and batch size of a given loader and batch them their own way (order, simulation,
        cached features), so a loader from ``dataloader.train_loader()`` gives the run ``run_experiment``
        gives."""
        if train_loader is None:
            train_loader, valid_loader = self.dataloader.train_loader(), self.dataloader.valid_loader()
        return train_loader, num_epochs or self.config["train"].get("epochs", 1), valid_loader

    # -- shared evaluation --------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, test_loader: DataLoader, desc: str = "predict", held_out: bool = False,
                ground_truth: bool = False) -> Predictions:
        """Maps and scores for every image of ``test_loader`` at the model input; with ``ground_truth`` (a
        split of an AnomalyDataset), also each map resized to the evaluation resolution (``data.mask_size``)
        beside the mask read again from its original file, never from the mask already resized to the input.

        ``held_out``: the loader walks the fit's own images in fit order, each scored leave-one-out.
        Native size: maps and masks are lists (one [1, H, W] per image), the evaluation maps those maps.
        The result unpacks as the design's ``scores, labels = trainer.predict(test_loader)``.
        """
        resolution = evaluation_resolution(self.config["data"]) if ground_truth else None
        images = getattr(test_loader.dataset, "images", None) or test_loader.dataset  # cached features name their images
        index = {str(sample.path): i for i, sample in enumerate(images.samples)} if resolution else {}
        parts: dict[str, list] = {"scores": [], "maps": [], "labels": [], "masks": [], "paths": [], "types": [],
                                  "eval_maps": [], "eval_masks": []}
        seen = 0
        for batch in tqdm(test_loader, desc=desc, leave=False, dynamic_ncols=True):
            raise_if_interrupted()
            positions = torch.arange(seen, seen + len(batch["label"])) if held_out else None
            seen += len(batch["label"])
            output = self.modeler.evaluate_step(batch, positions)
            maps = output["anomaly_maps"]
            maps = [heat.float().cpu() for heat in maps] if isinstance(maps, list) else maps.float().cpu()
            for heat, path in zip(maps if resolution else [], batch["image_path"]):
                mask = images.ground_truth(index[path], resolution)[0]
                parts["eval_masks"].append(mask.numpy().astype(bool))
                native = isinstance(maps, list) and heat.shape[-2:] == mask.shape  # already the file's own size
                parts["eval_maps"].append(heat[0].numpy() if native else upsample_maps(heat[None], mask.shape)[0, 0].numpy())
            parts["scores"].append(output["anomaly_scores"].float().cpu())
            parts["maps"].append(maps)
            parts["labels"].append(batch["label"])
            parts["masks"].append(batch["mask"])
            parts["paths"].extend(batch["image_path"])
            parts["types"].extend(batch["defect_type"])
        if not parts["scores"]:
            raise FrameworkError(f"No images to {desc}: the split is empty")
        return Predictions(
            scores=torch.cat(parts["scores"]),
            maps=joined(parts["maps"]),
            labels=torch.cat(parts["labels"]),
            masks=joined(parts["masks"]),
            image_paths=parts["paths"],
            defect_types=parts["types"],
            eval_maps=parts["eval_maps"] if resolution else None,
            eval_masks=parts["eval_masks"] if resolution else None,
        )

    def normal_predictions(self) -> tuple[Predictions, str]:
        """Predictions on normal images the model was not fitted on, and what they are.

        Held-out train/good when ``data.val_fraction`` > 0; else the training images themselves, whose
        scores are biased low for any model fitted on them (memory trainers override this).
        """
        loader = self.eval_loader(self.dataloader.valid_dataset, "valid")
        if loader is not None:
            return self.predict(loader, desc="threshold"), "held-out train/good"
        warnings.warn("The threshold is calibrated on the training images themselves (data.val_fraction=0), whose "
                      "scores are biased low: expect more false alarms on new normal images than the threshold intends; set "
                      "data.val_fraction > 0 to calibrate on held-out images")
        return (self.predict(self.eval_loader(self.dataloader.train_dataset, "train"), desc="threshold"),
                "train/good in-sample (biased low: set data.val_fraction > 0)")

    def calibrate_threshold(self) -> None:
        """Chooses the image and pixel thresholds by ``eval.threshold_strategy``; never from the test metrics' images.

        false_alarm_rate: the lowest order statistic of out-of-sample normal images' scores
        (``normal_predictions``) whose false-alarm rate meets the budget at the stated confidence, and for
        pixels the same of those images' map maxima (the share of normal images with a predicted pixel);
        normal_quantile: a quantile of the same scores and maxima (at 1.0 no calibration image has a
        predicted pixel); f1_adaptive: best F1 on the labelled validation share of the test split,
        excluded from the metrics, per image and per pixel; manual: ``eval.threshold_value`` for both.
        """
        evaluation = self.config["eval"]
        strategy = evaluation["threshold_strategy"]
        start = time.perf_counter()
        if strategy == "manual":
            self.threshold, self.threshold_source = float(evaluation["threshold_value"]), "manual (eval.threshold_value)"
            self.pixel_threshold, self.pixel_threshold_source = self.threshold, self.threshold_source
        elif strategy == "f1_adaptive":
            loader = self.eval_loader(self.dataloader.labelled_valid_dataset, "labelled-valid")
            if loader is None:
                raise FrameworkError("eval.threshold_strategy=f1_adaptive needs a labelled validation set: set "
                                     "data.labelled_val_fraction > 0 (a seeded share of the test split, then excluded "
                                     "from the test metrics), or use normal_quantile")
            predictions = self.predict(loader, desc="threshold")
            self.threshold = f1_adaptive_threshold(predictions.labels.numpy(), predictions.scores.numpy())
            self.score_scale = score_scale(self.threshold, predictions.scores[predictions.labels == 0].numpy())
            anomalous = int(predictions.labels.sum())
            self.threshold_source = (f"f1_adaptive on the labelled validation split ({len(predictions.labels)} test "
                                     f"images held out: {anomalous} anomalous)")
            self.pixel_threshold, self.pixel_threshold_source = self.threshold, "the image threshold (no masks)"
            masks = flat(predictions.masks) if self.dataloader.has_masks else None
            if masks is not None and masks.any():
                self.pixel_threshold = f1_max(masks, flat(predictions.maps))[1]
                self.pixel_threshold_source = "pixel F1-max on the labelled validation split's masks"
        else:
            self.calibrate_on_normal_scores(evaluation)
        self.timings["threshold"] = time.perf_counter() - start

    def calibrate_on_normal_scores(self, evaluation: dict) -> None:
        """false_alarm_rate / normal_quantile: thresholds from out-of-sample normal images' scores (image)
        and map maxima (pixel), and the normalised score's scale from the same scores."""
        predictions, split = self.normal_predictions()
        scores, maxima = predictions.scores.numpy(), map_maxima(predictions.maps).numpy()
        if evaluation["threshold_strategy"] == "false_alarm_rate":
            budget, confidence = evaluation["false_alarm_rate"], evaluation["false_alarm_confidence"]
            self.threshold, self.threshold_calibration = budget_threshold(scores, budget, confidence)
            self.pixel_threshold, self.pixel_threshold_calibration = budget_threshold(maxima, budget, confidence, "pixel")
            self.threshold_calibration["images"] = self.pixel_threshold_calibration["images"] = split
            rank = self.threshold_calibration["rank"]
            self.threshold_source = (f"false_alarm_rate={budget} at confidence {confidence}: rank {rank} (ascending) of "
                                     f"the scores of {split} ({len(scores)} images)")
            self.pixel_threshold_source = (f"false_alarm_rate={budget} at confidence {confidence} of the map maxima "
                                           "of the same images (share of normal images with a predicted pixel)")
        else:
            quantile = evaluation["threshold_quantile"]
            self.threshold = normal_threshold(scores, quantile)
            self.threshold_source = f"normal_quantile(q={quantile}) on {split} ({len(scores)} images)"
            self.pixel_threshold = normal_threshold(maxima, quantile)
            self.pixel_threshold_source = f"normal_quantile(q={quantile}) of the map maxima of the same images"
        self.score_scale = score_scale(self.threshold, scores)

    def evaluate(self, test_loader: DataLoader | None = None) -> Evaluation:
        """Scores ``test_loader`` (default the test split) and computes the test metrics.

        The result reads as the design's ``{"anomaly_maps", "anomaly_scores", "labels", "metrics"}`` and
        ``"predictions"`` (everything behind them: masks, paths, defect types, for figures and CSV), and
        unpacks as ``metrics, predictions``.
        """
        if self.threshold is None:
            self.calibrate_threshold()
        self.modeler.timer = StageTimer(self.device)
        start = time.perf_counter()
        if test_loader is None:  # the test split, through the family's cached features if any
            test_loader = self.eval_loader(self.dataloader.test_dataset, "test")
        predictions = self.predict(test_loader, desc="evaluate", ground_truth=True)
        metrics_start = time.perf_counter()
        if not self.dataloader.has_masks:
            warnings.warn("This category has no ground_truth folder: pixel metrics are unavailable")
        masks, maps = predictions.pixel_pairs() if self.dataloader.has_masks else (None, None)
        metrics = self.modeler.compute_test_metrics(predictions.labels.numpy(), predictions.scores.numpy(), masks,
                                                    maps, self.threshold, self.threshold_source)
        metrics["threshold_strategy"] = self.config["eval"]["threshold_strategy"]
        metrics["pixel_threshold"], metrics["pixel_threshold_source"] = self.pixel_threshold, self.pixel_threshold_source
        metrics["threshold_calibration"] = self.threshold_calibration
        metrics["pixel_threshold_calibration"] = self.pixel_threshold_calibration
        metrics["score_scale"] = self.score_scale
        end = time.perf_counter()
        self.timings.update(self.modeler.timer.as_dict("evaluate_"))
        self.timings["evaluate_metrics"] = end - metrics_start
        self.timings["evaluate"] = end - start
        self.timings["images_per_second"] = len(predictions.scores) / max(metrics_start - start, 1e-9)
        return Evaluation(metrics, predictions)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """A plain dict of tensors and primitives: loadable with ``torch.load(weights_only=True)``."""
        return {
            "format_version": 1,
            "model": self.modeler.state_dict(),
            "config": self.config,
            "weights": weights_record(self.modeler.model),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "pixel_threshold": self.pixel_threshold,
            "threshold_calibration": self.threshold_calibration,
            "score_scale": self.score_scale,
        }

    def save_checkpoint(self, path: Path | None = None) -> Path:
        path = Path(path or self.run_dir / CHECKPOINT_NAME)
        save_atomically(self.checkpoint(), path)
        return path
