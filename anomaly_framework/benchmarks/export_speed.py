"""Speed and real-data parity of exported models against the eager one (issue 17).

    python -m anomaly_framework.benchmarks.export_speed speed --checkpoint RUN_DIR          # a run's model
    python -m anomaly_framework.benchmarks.export_speed speed --model stfpm --backbone efficientnet_lite0  # untrained
    python -m anomaly_framework.benchmarks.export_speed parity --checkpoint RUN_DIR         # the run's test split

``speed`` exports the model to every installed format (in a temporary folder) and reports images per
second and latency per image at batch 1 and 32 for eager PyTorch, TorchScript, onnxruntime and OpenVINO,
all on the same uint8 inputs and the same thread count. ``parity`` scores the run's test split with the
eager model and every export and reports the largest absolute and relative differences of maps and
scores, the labels that differ, and image / pixel AUROC of each. Timings on a shared CPU are noisy.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomaly_framework.config import resolve_config
from anomaly_framework.deploy.export import (FORMATS, differences, eager_runner, export, input_side, load_artifact,
                                             load_run)
from anomaly_framework.factories import build_dataloader, build_model, build_modeler
from anomaly_framework.errors import FrameworkError

RUNTIMES = ("eager", "torchscript", "onnx", "openvino")


def installed_formats() -> list[str]:
    """Export formats whose runtime is installed here."""
    formats = ["torchscript"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        formats.append("onnx")
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("onnx"):
        formats.append("openvino")
    return formats


def untrained_run(name: str, backbone: str | None, folder: Path) -> Path:
    """A checkpoint of a model at its initialisation (threshold 0): enough to time it, not to score."""
    overrides = {"model.name": name, "output_dir": str(folder)}
    if backbone:
        overrides["model.backbone"] = backbone
    config = resolve_config(overrides)
    modeler = build_modeler(config, build_model(config))
    if modeler.one_pass:
        raise FrameworkError(f"'{name}' is fitted in one pass: time a fitted run with --checkpoint RUN_DIR")
    torch.save({"format_version": 1, "model": modeler.state_dict(), "config": config,
                "threshold": 0.0, "threshold_source": "none (untrained, speed benchmark only)"},
               folder / "checkpoint.pt")
    return folder


def runners(run_dir: Path, folder: Path, threads: int) -> dict:
    """The eager model and every installed export of it, behind one contract."""
    modeler, saved = load_run(run_dir)
    found = {"eager": eager_runner(modeler, saved["config"], saved["threshold"])}
    for format in installed_formats():
        path = export(run_dir, format, folder / f"model{FORMATS[format]}")
        found[format] = load_artifact(path, format, threads)
    return found, saved["config"], saved["threshold"]


def time_runner(run, images: np.ndarray, repeats: int) -> float:
    """Median seconds of one call on ``images`` after one warm-up call."""
    run(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def speed(run_dir: Path, batches: list[int], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        found, config, _ = runners(run_dir, Path(folder), threads)
        size = input_side(config["data"])  # a tiled run's artifact takes tiles
        rows = []
        for batch in batches:
            images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            for name, run in found.items():
                seconds = time_runner(run, images, repeats if batch == 1 else max(1, repeats // 5))
                rows.append({"model": config["model"]["name"], "backbone": config["model"].get("backbone", "none"),
                             "image_size": size, "runtime": name, "batch": batch, "images_per_s": batch / seconds,
                             "ms_per_image": 1000 * seconds / batch})
                print(f"{rows[-1]['model']:<10} {name:<12} batch {batch:>3}: {rows[-1]['images_per_s']:8.2f} img/s "
                      f"{rows[-1]['ms_per_image']:9.2f} ms/img", flush=True)
    return rows


def score_split(run, dataset, batch: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps [N, H, W], scores [N] and labels [N] of every image of ``dataset`` (uint8, as the dataset
    preprocesses them)."""
    outputs = []
    for start in range(0, len(dataset), batch):
        indices = range(start, min(start + batch, len(dataset)))
        outputs.append(run(np.stack([dataset.load(i)[0].permute(1, 2, 0).numpy() for i in indices])))
    return tuple(np.concatenate(part) for part in zip(*outputs))


def parity(run_dir: Path, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        found, config, _ = runners(run_dir, Path(folder), threads)
        dataset = build_dataloader({**config, "data": {**config["data"], "cache": False}}).test_dataset
        labels = np.array([sample.label for sample in dataset.samples])
        masks = np.stack([dataset.load(i)[1][0].numpy() > 0 for i in range(len(dataset))])
        outputs = {name: score_split(run, dataset) for name, run in found.items()}
    rows = []
    for name, (maps, scores, predicted) in outputs.items():
        row = {"model": config["model"]["name"], "backbone": config["model"].get("backbone", "none"), "runtime": name,
               "image_auroc": roc_auc_score(labels, scores), "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel())}
        row.update(differences(outputs["eager"], (maps, scores, predicted)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "parity"])
    parser.add_argument("--checkpoint", help="a run folder")
    parser.add_argument("--model", help="speed only: an untrained gradient/flow model built from its defaults")
    parser.add_argument("--backbone", help="with --model: the backbone (efficientnet_lite0 here)")
    parser.add_argument("--batches", default="1,32", help="comma list of batch sizes (speed)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls at batch 1 (a fifth at larger batches)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_dir = Path(args.checkpoint) if args.checkpoint else untrained_run(args.model, args.backbone, Path(folder))
            if args.what == "speed":
                rows = speed(run_dir, [int(b) for b in args.batches.split(",")], args.repeats, args.threads)
            else:
                rows = parity(run_dir, args.threads)
    except FrameworkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
