"""The speed table on one device: the frozen extractor in each runtime, then cold PaDiM and PatchCore runs.

Written for the GPU column of docs/speed.md (run it when a GPU is lent: ``--device cuda``); ``--device cpu``
gives the CPU column with the same code. Nothing here needs a GPU to import or to run on the CPU.

    python tools/benchmarks/gpu_speed.py --device cuda --data-root /work/data --json gpu_speed.json

Part 1 times ``TimmFeatureExtractor(<backbone>, <PaDiM layers>)`` (the package weights for Lite0) on
``--batches`` batches of ``--batch-size`` random 224 px images after one warm-up batch, for every runtime
installed, and checks each against eager (largest difference relative to the largest feature value).
Part 2 runs ``main.py`` for PaDiM and PatchCore (``--coreset-ratio``) on bottle, each in a fresh cache
folder (cold: decoding, export and backbone included), with ``model.backbone_runtime=auto``, and records
the wall time of each process and its image/pixel AUROC.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from anomaly_framework.backbones.extractors import TimmFeatureExtractor  # noqa: E402
from anomaly_framework.backbones.runtimes import RUNTIMES, RUNTIME_PACKAGES  # noqa: E402


def installed_runtimes() -> list[str]:
    return [name for name in RUNTIMES[1:]
            if all(importlib.util.find_spec(package) for package in RUNTIME_PACKAGES.get(name, ()))]


def time_extractor(args: argparse.Namespace, runtime: str, folder: Path) -> dict:
    """Seconds per batch of the frozen extractor in ``runtime`` and its largest relative difference to eager."""
    device = torch.device(args.device)
    extractor = TimmFeatureExtractor(args.backbone, [1, 2, 3], pretrained=True).to(device)
    extractor.use_runtime(runtime, folder)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = extractor.eager(images)
        start = time.perf_counter()
        features = extractor(images)  # warm-up, and the export on first use
        first = time.perf_counter() - start
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(args.batches):
            extractor(images)
        sync()
    per_batch = (time.perf_counter() - start) / args.batches
    difference = max(float((got - want).abs().max() / want.abs().max()) for got, want in zip(features, reference))
    return {"runtime": runtime, "seconds_per_batch": round(per_batch, 4), "first_call_s": round(first, 2),
            "max_relative_difference": difference}


def cold_run(args: argparse.Namespace, model: str) -> dict:
    """One ``main.py`` run in a fresh cache folder; its wall time and metrics."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as output:
        command = [sys.executable, str(ROOT / "main.py"), "--model", model, "--dataset", "mvtec", "--category",
                   args.category, "--data-root", args.data_root, "--backbone", args.backbone, "--device",
                   args.device, "--output-dir", output, "--set", "model.backbone_runtime=auto"]
        if model == "patchcore":
            command += ["--set", f"model.coreset_ratio={args.coreset_ratio}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "ANOMALY_FRAMEWORK_CACHE": cache},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = json.loads(next(Path(output).rglob("results.json")).read_text())
    metrics = results.get("metrics", {})
    return {"model": model, "wall_s": round(wall, 2), "image_auroc": metrics.get("image_auroc"),
            "pixel_auroc": metrics.get("pixel_auroc"), "command": " ".join(command)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--data-root", default="/work/data")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--skip-runs", action="store_true", help="part 1 only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed.py: --device cuda, but torch sees no CUDA device (use --device cpu)")
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        report["extractor"] = [time_extractor(args, runtime, Path(folder)) for runtime in installed_runtimes()]
    for row in report["extractor"]:
        print(f"{row['runtime']:12s} {row['seconds_per_batch']:.4f} s/batch  (first call {row['first_call_s']} s, "
              f"max rel. difference {row['max_relative_difference']:.1e})")
    if not args.skip_runs:
        report["cold_runs"] = [cold_run(args, model) for model in ("padim", "patchcore")]
        for row in report["cold_runs"]:
            print(f"{row['model']:10s} cold {row['wall_s']:.1f} s  image AUROC {row['image_auroc']}  pixel AUROC {row['pixel_auroc']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
