"""``--benchmark``: one run's stage timings set beside floors measured on the same machine (image loading,
the backbone alone, a memory copy, the matrix-product rate), so a slow stage is told from a slow machine."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_dataloader, build_model
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment
from anomaly_framework.utils import resolve_device


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of a plain large-array copy on this machine: the floor a memory-bound loop can reach."""
    source = torch.ones(megabytes * 2**18)
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    return source.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Float32 matrix-product rate on this device: the floor of a brute-force search built on matrix products."""
    left, right = torch.randn(2 * size, size, device=device), torch.randn(size, 2 * size, device=device)
    with torch.inference_mode():
        left @ right  # warm-up: thread pool and kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            left @ right
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * (2 * size) * size * (2 * size) * repeats / (time.perf_counter() - start) / 1e9


def search_arithmetic_tflop(run_dir: str, fit: dict, test_images: int, data: dict) -> float | None:
    """2 · test patches · bank entries · dimension: the work of the brute-force exact nearest-neighbour
    search (the official one) over the test split, for models with a memory bank (None for the others).
    A tiled run searches every tile's patches: the model's grid at the tile size times the tiles of an image."""
    if "bank_patches" not in fit:
        return None
    modeler, _ = load_checkpoint(run_dir)  # the patch grid per image, from the fitted model itself
    side = data.get("tile_size") or data["image_size"]
    with torch.inference_mode():
        _, height, width, _ = modeler.model.embed(torch.zeros(1, 3, side, side)).shape
    tiles = modeler.tiles_per_image()
    return 2 * test_images * tiles * height * width * fit["bank_patches"] * fit["bank_dim"] / 1e12


def backbone_floor(config: dict) -> dict:
    """Image loading and backbone-only forward time over the train and test images of a run."""
    device = resolve_device(config["device"])
    dataloader = build_dataloader(config)
    extractor = next(m for m in build_model(config).modules() if isinstance(m, TimmFeatureExtractor)).to(device)
    loaders = [dataloader.train_loader(shuffle=False), dataloader.test_loader()]
    start = time.perf_counter()
    batches = [batch["image"] for loader in loaders for batch in loader]
    loading = time.perf_counter() - start
    with torch.inference_mode():
        extractor(batches[0].to(device))  # warm-up: allocator and kernel selection
        start = time.perf_counter()
        for images in batches:
            extractor(images.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {"image_loading": loading, "backbone_forward": time.perf_counter() - start,
            "images": sum(len(images) for images in batches), "test_images": len(dataloader.test_dataset)}


def run_benchmark(config: dict | None = None) -> dict:
    """Runs one experiment and sets its stage timings beside the floors measured on the same machine."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FrameworkError("--benchmark times a single process against single-process floors: run it without torchrun")
    resolved = resolve_config(config)
    if not isinstance(resolved["data"]["image_size"], int):
        raise FrameworkError("--benchmark measures its floors on images of one size: set data.image_size to a "
                             "number (native sizes vary per image)")
    floor = backbone_floor(resolved)
    copy_gbs = copy_bandwidth_gbs()
    gflops = matmul_gflops(resolve_device(resolved["device"]))
    results = run_experiment(config)
    timings = results["timings"]
    coreset = timings.get("fit_coreset", 0.0)
    except_coreset = timings["fit"] - coreset + timings["evaluate"]
    report = {
        "images": floor["images"],
        "image_loading_s": floor["image_loading"],
        "backbone_forward_s": floor["backbone_forward"],
        "fit_s": timings["fit"], "fit_features_s": timings.get("fit_features"), "fit_coreset_s": coreset,
        "evaluate_s": timings["evaluate"], "evaluate_features_s": timings.get("evaluate_features"),
        "evaluate_search_s": timings.get("evaluate_search"), "evaluate_maps_s": timings.get("evaluate_maps"),
        "evaluate_metrics_s": timings.get("evaluate_metrics"), "threshold_s": timings.get("threshold"),
        "all_but_coreset_over_backbone": except_coreset / floor["backbone_forward"],
        "all_but_coreset_over_loading_plus_backbone": except_coreset / (floor["backbone_forward"] + floor["image_loading"]),
        "images_per_second": timings["images_per_second"],
        "peak_memory_mb": results["peak_memory_mb"],
        "copy_gb_per_s": copy_gbs,
        "matmul_gflops": gflops,
    }
    stats = results["fit"].get("coreset")
    if stats and coreset > 0:
        report["coreset_gb_per_s"] = stats["steps"] * stats["bytes_per_step"] / coreset / 1e9
    search_tflop = search_arithmetic_tflop(results["run_dir"], results["fit"], floor["test_images"], resolved["data"])
    if search_tflop is not None:
        # A brute-force search cannot beat its arithmetic at the machine's matrix-product rate.
        search_floor = search_tflop * 1e3 / gflops
        report["search_tflop"] = search_tflop
        report["search_at_matmul_rate_s"] = search_floor
        report["loading_backbone_search_floor_over_backbone"] = (
            floor["image_loading"] + floor["backbone_forward"] + search_floor) / floor["backbone_forward"]
    (Path(results["run_dir"]) / "benchmark.json").write_text(json.dumps(report, indent=2))
    print("\n== Benchmark ==")
    for key, value in report.items():
        print(f"  {key:<44} {value:.3f}" if isinstance(value, float) else f"  {key:<44} {value}")
    return {**results, "benchmark": report}
