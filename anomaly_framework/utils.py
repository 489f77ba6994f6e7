"""Shared helpers: run status files, seeding, device resolution, stage timing and console reports."""
from __future__ import annotations

import contextlib
import platform
import random
import resource
import sys
import time
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import torch

from anomaly_framework.errors import FrameworkError
from anomaly_framework.metrics.metrics_base import compute_image_metrics


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the run stopped and how to go on."""


STATUS_NAME = "status.json"


def write_status(run_dir, status: str, **details: str) -> None:
    """Records a run's state in ``status.json``: running, done, failed (with ``error``) or interrupted
    (with ``message``), so that sweeps, ``--skip-done`` and people can tell a finished run from a dead one."""
    import datetime as dt
    import json
    import os
    from pathlib import Path

    record = {"status": status, "updated": dt.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
              **details}
    path = Path(run_dir) / STATUS_NAME
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path)  # never a half-written status


def read_status(run_dir) -> dict:
    """``status.json`` of a run folder; folders written before it existed count as done when they hold
    results.json, else as unknown."""
    import json
    from pathlib import Path

    path = Path(run_dir) / STATUS_NAME
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {"status": "unknown", "error": f"unreadable {path}"}
    return {"status": "done" if (Path(run_dir) / "results.json").is_file() else "unknown"}


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA) so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FrameworkError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work so wall-clock stage timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates wall-clock seconds per named stage (``with timer("features"): ...``)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{stage}": round(value, 4) for stage, value in self.seconds.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def library_versions() -> dict[str, str]:
    """Versions that change numbers (P13): torch, torchvision, timm, numpy, python."""
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def _print_block(title: str, rows: dict[str, Any]) -> None:
    width = max((len(str(key)) for key in rows), default=0)
    print(f"\n== {title} ==", file=sys.stdout)
    for key, value in rows.items():
        print(f"  {str(key):<{width}}  {value}")


def show_data_info(info: dict[str, Any]) -> None:
    """Prints what the dataloader found: root, category, protocol and counts per split."""
    _print_block("Data", info)


def show_model_info(model: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Prints the model class, its parameter counts and backbone facts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    rows = {"model": type(model).__name__, "parameters": f"{total:,} ({trainable:,} trainable)", "buffers": f"{buffers:,}"}
    _print_block("Model", {**rows, **(extra or {})})


def show_train_info(config: dict, device: torch.device, run_dir: Any) -> None:
    """Prints the trainer family, its settings, the device and where outputs go."""
    rows = {"trainer": config["train"]["trainer"], "device": str(device), "seed": config["seed"], "run folder": run_dir}
    rows.update({f"train.{k}": v for k, v in config["train"].items() if k != "trainer"})
    _print_block("Training", rows)


def _format_metric(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict) and "expected_false_alarm_rate" in value:  # a false-alarm-budget calibration record
        low, high = value["false_alarm_rate_interval"]
        certified = ("certified" if value["certified"] else
                     f"not certified: {value['n']} images certify >= {value['smallest_certifiable_false_alarm_rate']:.3g}")
        return (f"budget {value['false_alarm_rate']} at confidence {value['confidence']} ({certified}); rank "
                f"{value['rank']} of {value['n']}; expected false-alarm rate {value['expected_false_alarm_rate']:.3f} "
                f"[{low:.3f}, {high:.3f}]")
    return str(value)


def show_results(results: dict[str, Any] | Any, labels: Any = None, threshold: float | None = None) -> dict[str, Any]:
    """Prints a run's metrics and timings as a readable two-column table.

    ``results`` is what ``run_experiment`` returns; or, as in the design's notebook, give the
    ``scores, labels`` that ``trainer.predict`` returns and their image metrics are printed (at
    ``threshold`` when given). Returns what was printed.
    """
    if labels is not None:

        source = "given" if threshold is not None else "none"
        results = {"metrics": compute_image_metrics(np.asarray(labels), np.asarray(results, dtype=np.float64),
                                                    threshold, source)}
    names = {"separation": "separation (Cohen's d)", "threshold_calibration": "threshold calibration",
             "pixel_threshold_calibration": "pixel calibration"}
    _print_block("Metrics", {names.get(key, key): _format_metric(value) for key, value in results["metrics"].items()})
    if "timings" in results:
        timings = {key: f"{value:.2f} s" if key != "images_per_second" else f"{value:.1f}"
                   for key, value in results["timings"].items()}
        _print_block("Timings", timings)
    if "run_dir" in results:
        _print_block("Run", {"peak memory": f"{results['peak_memory_mb']:.0f} MB", "backbone": results["backbone"],
                             "weights": results["weights_source"],
                             "weights sha256": results.get("weights_sha256") or "-",
                             "pixel metrics at": results.get("pixel_resolution", "-"), "run folder": results["run_dir"]})
    return results


def save_scores_csv(run_dir, predictions) -> Any:
    """Per-image test results as ``scores.csv`` (path, defect type, label, score), for later analysis."""
    import csv

    path = run_dir / "scores.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "defect_type", "label", "score"])
        for row in zip(predictions.image_paths, predictions.defect_types, predictions.labels.tolist(),
                       predictions.scores.tolist()):
            writer.writerow([row[0], row[1], row[2], repr(row[3])])
    return path


def save_roc_curve(run_dir, labels: np.ndarray, scores: np.ndarray, auroc: float | None) -> Any:
    """The image-level ROC curve as ``roc_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(fpr, tpr, label=f"image AUROC {auroc:.4f}" if auroc is not None else None)
    axis.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.legend(loc="lower right")
    path = run_dir / "roc_curve.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
