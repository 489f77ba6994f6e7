"""One row of docs/high_resolution.md: a run (resized or tiled) evaluated at native resolution, plus the recall
of small defects at the run's calibrated pixel threshold, wall and CPU time and peak memory.

    OMP_NUM_THREADS=1 python tools/benchmarks/high_resolution.py --model padim --data-root /work/data \
        --image-size 896 --tile-size 224 --tile-stride 112 --out rows.jsonl

Small defects: connected regions (8-connectivity) of a test mask at native resolution smaller than
``--small-fraction`` (0.1 %) of the image's area. A region is found when one of its pixels reaches the
pixel threshold; its overlap is the share of its pixels that do (the per-region overlap of AU-PRO, at the
calibrated threshold instead of integrated over thresholds).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from anomaly_framework.main import run_experiment
from anomaly_framework.trainers.trainer_base import BaseTrainer


def region_recall(masks: list[np.ndarray], maps: list[np.ndarray], threshold: float, small_fraction: float) -> dict:
    """Found share and mean overlap of the small and of all ground-truth regions at ``threshold``."""
    found = {"small": [], "all": []}
    overlap = {"small": [], "all": []}
    for mask, heat in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for region in range(1, count + 1):
            pixels = labelled == region
            flagged = heat[pixels] >= threshold
            kinds = ["all"] + (["small"] if pixels.sum() < small_fraction * mask.size else [])
            for kind in kinds:
                found[kind].append(bool(flagged.any()))
                overlap[kind].append(float(flagged.mean()))
    return {f"{kind}_regions": len(found[kind]) for kind in found} | {
        f"{kind}_found": (float(np.mean(found[kind])) if found[kind] else None) for kind in found} | {
        f"{kind}_overlap": (float(np.mean(overlap[kind])) if overlap[kind] else None) for kind in overlap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-root", required=True, help="folder holding bottle/")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--tile-stride", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--tile-ensemble", choices=("true", "false"),
                        help="PaDiM: one Gaussian set per tile position, or one shared (default: the config's)")
    parser.add_argument("--coreset-ratio", type=float, help="PatchCore's model.coreset_ratio (default 0.1)")
    parser.add_argument("--small-fraction", type=float, default=0.001)
    parser.add_argument("--medium-fraction", type=float, default=0.01, help="a second, larger size class")
    parser.add_argument("--out", required=True, help="JSON lines file the row is appended to")
    parser.add_argument("--output-dir", default="experiments/high_resolution")
    args = parser.parse_args()

    captured = {}
    evaluate = BaseTrainer.evaluate

    def keep(self, *a, **k):
        captured["evaluation"] = result = evaluate(self, *a, **k)
        return result
    BaseTrainer.evaluate = keep
    config = {"model": {"name": args.model, "backbone": args.backbone},
              "data": {"name": "mvtec", "category": args.category, "root": args.data_root,
                       "image_size": args.image_size, "tile_size": args.tile_size, "tile_stride": args.tile_stride,
                       "mask_size": "native"},
              "output_dir": args.output_dir, "eval": {"num_figures": 2}}
    if args.epochs:
        config["train"] = {"epochs": args.epochs}
    if args.coreset_ratio:
        config["model"]["coreset_ratio"] = args.coreset_ratio
    if args.tile_ensemble:
        config["model"]["tile_ensemble"] = args.tile_ensemble == "true"
    start, cpu_start = time.perf_counter(), os.times()
    results = run_experiment(config)
    wall, cpu = time.perf_counter() - start, os.times()
    metrics = results["metrics"]
    run_config = json.loads((Path(results["run_dir"]) / "config.json").read_text())
    predictions = captured["evaluation"]["predictions"]
    recall = region_recall(predictions.eval_masks, predictions.eval_maps, metrics["pixel_threshold"], args.small_fraction)
    medium = region_recall(predictions.eval_masks, predictions.eval_maps, metrics["pixel_threshold"], args.medium_fraction)
    recall.update({key.replace("small", "medium"): value for key, value in medium.items() if key.startswith("small")})
    row = {"model": args.model, "backbone": args.backbone, "image_size": args.image_size, "tile_size": args.tile_size,
           "tile_stride": args.tile_stride, "epochs": args.epochs, "coreset_ratio": args.coreset_ratio,
           "tile_ensemble": run_config["model"].get("tile_ensemble"),
           **{key: metrics[key] for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_threshold")}, **recall,
           "wall_s": round(wall, 1), "cpu_s": round(cpu.user + cpu.system - cpu_start.user - cpu_start.system, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "load": os.getloadavg(), "run_dir": results["run_dir"], "timings": results.get("timings")}
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
