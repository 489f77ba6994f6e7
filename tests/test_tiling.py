"""Tiled inference and training (issue 26): the cut/stitch math against a brute-force reference, every tiled
model's maps against its own untiled maps of each tile stitched by hand, cached = uncached scores, the ONNX
runner = the eager tiled model, a 4000×3000 image within bounded memory, and the one-line config errors."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_dataloader, build_model
from anomaly_framework.images.tiling import add_tiles, cut, overlap_weights, stitch, tile_origins, tile_starts
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_base import check_tiling

ROOT = Path(__file__).resolve().parents[1]
IMAGE, TILE, STRIDE = 64, 48, 16  # 2×2 overlapping tiles
# PaDiM with its shared Gaussian set (the tiled ensemble, its default at a fixed size: test_tile_ensemble.py).
MODELS = {"padim": {"tile_ensemble": False}, "patchcore": {"coreset_ratio": 0.25}, "stfpm": {}, "fastflow": {}}


def brute_force_stitch(tile_maps: np.ndarray, height: int, width: int, tile: int, stride: int) -> np.ndarray:
    """Each pixel: the mean of the values every tile covering it gives it (float64, pixel by pixel)."""
    origins = tile_origins(height, width, tile, stride)
    result = np.zeros((height, width))
    for row in range(height):
        for col in range(width):
            values = [tile_maps[k][row - y, col - x] for k, (y, x) in enumerate(origins)
                      if y <= row < y + tile and x <= col < x + tile]
            result[row, col] = np.mean(values)
    return result


@pytest.mark.parametrize("height, width, tile, stride", [
    (12, 12, 4, 4),   # whole tiles, no overlap
    (10, 13, 4, 4),   # uneven edges: the last tiles moved inward overlap their neighbours
    (11, 9, 4, 2),    # overlapping, uneven, not square
    (9, 9, 5, 3),
    (8, 8, 8, 8),     # one tile
])
def test_stitching_equals_the_brute_force_mean_of_covering_tiles(height, width, tile, stride):
    origins = tile_origins(height, width, tile, stride)
    maps = np.random.default_rng(height * width + stride).random((len(origins), tile, tile)).astype(np.float32)
    expected = brute_force_stitch(maps, height, width, tile, stride)
    np.testing.assert_allclose(stitch(maps, height, width, tile, stride), expected, rtol=1e-6)
    # The modelers' torch path: the same additions into a tensor, then the same weights.
    total = torch.zeros(1, 1, height, width)
    add_tiles(total, [torch.from_numpy(m)[None] for m in maps], [(0, k) for k in range(len(origins))], origins)
    rows, cols = overlap_weights(height, width, tile, stride)
    np.testing.assert_allclose((total[0, 0] * torch.from_numpy(rows) * torch.from_numpy(cols)).numpy(), expected, rtol=1e-6)


def test_tiles_cover_the_image_and_cutting_then_stitching_gives_it_back():
    assert tile_starts(10, 4, 4) == [0, 4, 6] and tile_starts(10, 4, 3) == [0, 3, 6] and tile_starts(8, 4, 4) == [0, 4]
    image = np.random.default_rng(0).random((13, 10)).astype(np.float32)
    origins = tile_origins(13, 10, 4, 3)
    np.testing.assert_array_equal(stitch(np.stack(cut(image, origins, 4)), 13, 10, 4, 3), image)


def _config(root, tmp_path, name, **data):
    config = {"model": {"name": name, "backbone": "resnet18", "pretrained": False, **MODELS[name]},
              "data": {"name": "demo", "root": str(root), "image_size": IMAGE, "batch_size": 16,
                       "tile_size": TILE, "tile_stride": STRIDE, **data},
              "output_dir": str(tmp_path / "runs"), "eval": {"num_figures": 1}}
    if name in ("stfpm", "fastflow"):
        config["train"] = {"epochs": 1}
    return config


@pytest.fixture(scope="module")
def tiled_runs(tmp_path_factory, demo_root):
    """One tiled run of every model with a feature backbone (random weights, 64 px, 2×2 tiles of 48)."""
    tmp_path = tmp_path_factory.mktemp("tiled")
    return {name: run_experiment(_config(demo_root, tmp_path, name)) for name in MODELS}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_tiled_model_stitches_its_own_tile_maps(tiled_runs, demo_root, name):
    """End to end: the run evaluated at native resolution, and its reloaded model's map of an image is the
    brute-force stitch of the untiled model's maps of each tile, the score that map's maximum."""
    results = tiled_runs[name]
    assert json.loads((Path(results["run_dir"]) / "config.json").read_text())["data"]["mask_size"] == "native"
    modeler, _ = load_checkpoint(results["run_dir"], "cpu")
    images = torch.stack([build_dataloader(modeler.config).test_dataset[i]["image"] for i in range(2)])
    with torch.no_grad():
        tiled = modeler.evaluate_step({"image": images})
        modeler.tiling_enabled = False
        origins = tile_origins(IMAGE, IMAGE, TILE, STRIDE)
        for image, stitched, score in zip(images, tiled["anomaly_maps"], tiled["anomaly_scores"]):
            tiles = torch.stack(cut(image, origins, TILE))
            tile_maps = modeler.evaluate_step({"image": tiles})["anomaly_maps"][:, 0].numpy()
            expected = brute_force_stitch(tile_maps, IMAGE, IMAGE, TILE, STRIDE)
            np.testing.assert_allclose(stitched[0].numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
            assert float(score) == pytest.approx(expected.max(), rel=1e-5)


def test_cached_and_uncached_features_give_identical_scores(tiled_runs, demo_root, tmp_path):
    """PaDiM tiled: features from the run's memory cache (first run), the disk cache (a rerun) and the
    backbone on every pass (no cache at all) give the same scores, map for map."""
    first = Path(tiled_runs["padim"]["run_dir"])
    again = Path(run_experiment(_config(demo_root, tmp_path, "padim"))["run_dir"])
    uncached = Path(run_experiment({**_config(demo_root, tmp_path, "padim", cache=False),
                                    "train": {"feature_cache_mb": 0, "feature_disk_cache_mb": 0}})["run_dir"])
    reference = (first / "scores.csv").read_text()
    assert "score" in reference.splitlines()[0] and len(reference.splitlines()) > 10
    assert (again / "scores.csv").read_text() == reference
    assert (uncached / "scores.csv").read_text() == reference


def test_onnx_runner_tiles_and_stitches_as_the_eager_model(tiled_runs, demo_root, tmp_path):
    pytest.importorskip("onnxruntime")
    from anomaly_framework.deploy.export import export
    from anomaly_framework.deploy.onnx_runner import OnnxDetector

    run_dir = tiled_runs["padim"]["run_dir"]
    artifact = export(run_dir, "onnx", tmp_path / "model.onnx")
    sidecar = json.loads(Path(f"{artifact}.json").read_text())
    assert sidecar["input"]["shape"] == ["batch", TILE, TILE, 3]
    assert (sidecar["input"]["tile_size"], sidecar["input"]["tile_stride"]) == (TILE, STRIDE)
    detector = OnnxDetector(artifact)
    paths = sorted((Path(demo_root) / "fabric" / "test").rglob("*.png"))[:3]
    uint8 = np.stack([detector.load(path) for path in paths])
    maps, scores, labels = detector.detect(uint8, batch_size=3)
    eager_scores, threshold = assert_runner_matches_eager(run_dir, uint8, maps, scores)
    assert labels.tolist() == [int(float(s) >= threshold) for s in eager_scores]


def assert_runner_matches_eager(run_dir, uint8: np.ndarray, maps: np.ndarray, scores: np.ndarray):
    """The runner's maps and scores of uint8 RGB images [B, H, W, 3] against the run's eager (tiled) model;
    returns the eager scores and the run's threshold."""
    modeler, saved = load_checkpoint(run_dir, "cpu")
    images = (torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        eager = modeler.evaluate_step({"image": images})
    reference = eager["anomaly_maps"][:, 0].numpy()
    np.testing.assert_allclose(maps, reference, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(scores, eager["anomaly_scores"].numpy(), rtol=1e-4)
    return eager["anomaly_scores"], saved["threshold"]


def test_a_4000_by_3000_image_is_predicted_within_bounded_memory(tiled_runs, tmp_path):
    """A PaDiM fitted on 48 px tiles scores a 4000×3000 photo read at 1024 px (484 tiles of 48): peak RSS grows
    by the decoded photo and arrays at 1024 px, not by the tiles' activations (an untiled PaDiM at 1024 px
    could not even be fitted: 65,536 Gaussians). Warmed up first by a 64 px run of the same model."""
    run_dir = Path(tiled_runs["padim"]["run_dir"])
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    state["config"]["data"].update({"image_size": 1024, "crop_ratio": 1.0, "tile_stride": TILE, "cache": False})
    torch.save(state, tmp_path / "big_checkpoint.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(tmp_path / "big.bmp")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "small.png")
    script = textwrap.dedent(f"""
        import resource, json
        from anomaly_framework.inference.predict import predict
        predict({str(run_dir)!r}, {str(tmp_path / 'small.png')!r}, {str(tmp_path / 'out1')!r}, overlays=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = predict({str(tmp_path / 'big_checkpoint.pt')!r}, {str(tmp_path / 'big.bmp')!r}, {str(tmp_path / 'out2')!r},
                       overlays=False)["rows"]
        print(json.dumps({{"growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                          "score": rows[0]["score"]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Decoded photo 36 MB and its RGB copy 36 MB, the 1024² input (uint8 3 MB, float 12 MB), the stitched map
    # 4 MB; 16 tiles of 48 px through R18 stages 1-3 take about 1 MB.
    assert report["growth_mb"] < 150, report
    assert np.isfinite(report["score"])


@pytest.mark.parametrize("data, fragment", [
    ({"image_size": 64, "tile_size": 96}, "'data.tile_size' must be in 1..data.image_size=64"),
    ({"image_size": 96, "tile_size": 64, "tile_stride": 80}, "'data.tile_stride' must be in 1..data.tile_size=64"),
    ({"image_size": 96, "tile_stride": 32}, "'data.tile_stride'=32 needs data.tile_size"),
    ({"image_size": 96, "tile_size": 0}, "'data.tile_size' must be in 1..data.image_size=96"),
    ({"image_size": 96, "tile_size": "big"}, "'data.tile_size' must be int or null"),
])
def test_bad_tile_settings_are_one_line_errors(data, fragment):
    with pytest.raises(FrameworkError) as error:
        resolve_config({"data": data})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_models_without_a_backbone_or_too_small_tiles_are_refused_before_any_work():
    ae = resolve_config({"model": {"name": "ae"}, "data": {"image_size": 64, "tile_size": 32}})
    with pytest.raises(FrameworkError, match="has no feature backbone to tile"):
        check_tiling(build_model(ae), ae["data"])
    padim = resolve_config({"model": {"name": "padim", "backbone": "resnet18", "pretrained": False},
                            "data": {"image_size": 64, "tile_size": 4}})
    with pytest.raises(FrameworkError, match=r"data.tile_size=4 is too small for resnet18.*the minimum is 16"):
        check_tiling(build_model(padim), padim["data"])
    plugin = build_model(padim)
    plugin.tileable = False  # a model opts out (or in) by its own attribute
    with pytest.raises(FrameworkError, match="has no feature backbone to tile"):
        check_tiling(plugin, {"tile_size": 32})
