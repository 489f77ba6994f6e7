"""PaDiM's tiled ensemble (``model.tile_ensemble``): one Gaussian set per tile position, checked against one
untiled PaDiM per tile position fitted on that position's crops, end to end, cached and not, and exported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import anomaly_framework.models.model_padim as model_padim
from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_dataloader
from anomaly_framework.images.tiling import cut, tile_origins
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_padim import COVARIANCE_EPS, PadimModel
from tests.test_tiling import assert_runner_matches_eager, brute_force_stitch

IMAGE, TILE, STRIDE = 64, 48, 16  # 2×2 overlapping tiles: 4 tile positions
GROUPS = 4


def _features(count: int, seed: int) -> list[torch.Tensor]:
    """Random features of ``count`` tiles as R18's stages 1-3 give them (64/128/256 channels, 8/4/2 grid)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, channels, side, side, generator=generator)
            for channels, side in ((64, 8), (128, 4), (256, 2))]


def _padim(**kwargs) -> PadimModel:
    return PadimModel("resnet18", layers=(1, 2, 3), pretrained=False, n_features=20, **kwargs)


def test_the_ensemble_is_one_padim_per_tile_position_bit_for_bit():
    """12 images of 4 tiles (image by image, tiles in order), fitted in two batches of 6 images: each tile
    position's distances, leave-one-out ones included, are those of a PaDiM fitted on that position alone."""
    ensemble = _padim(tile_ensemble=True)
    train, test = _features(12 * GROUPS, 0), _features(5 * GROUPS, 1)
    ensemble.begin_fit(12)
    ensemble.tile_positions = GROUPS
    for rows in (slice(0, 24), slice(24, 48)):
        ensemble.update([stage[rows] for stage in train])
    ensemble.finalize()
    assert ensemble.mean.shape == (GROUPS * 64, 20)  # 4 tile positions × an 8×8 grid
    scores = ensemble(test)["patch_scores"]
    held_out = ensemble.leave_one_out(train, torch.arange(12))["patch_scores"]
    assert scores.shape == (5 * GROUPS, 1, 8, 8) and held_out.shape == (12 * GROUPS, 1, 8, 8)
    for position in range(GROUPS):
        alone = _padim()
        alone.feature_index = ensemble.feature_index
        alone.begin_fit(12)
        for rows in (slice(position, 24, GROUPS), slice(24 + position, 48, GROUPS)):
            alone.update([stage[rows] for stage in train])
        alone.finalize()
        assert torch.equal(scores[position::GROUPS], alone([stage[position::GROUPS] for stage in test])["patch_scores"])
        expected = alone.leave_one_out([stage[position::GROUPS] for stage in train], torch.arange(12))["patch_scores"]
        assert torch.equal(held_out[position::GROUPS], expected)
    # The shared set (the default) differs: one Gaussian per grid position fitted on all 48 tiles.
    shared = _padim()
    shared.feature_index = ensemble.feature_index
    shared.begin_fit(48)
    shared.update(train)
    shared.finalize()
    assert shared.mean.shape == (64, 20) and not torch.allclose(shared(test)["patch_scores"], scores)
    with pytest.raises(FrameworkError, match="takes whole images: 6 tiles are not a multiple of its 4 tile positions"):
        ensemble([stage[:6] for stage in test])


def test_finalize_in_chunks_gives_the_whole_array_inverse_bit_for_bit(monkeypatch):
    """Chunks of 7 positions (not a divisor of 64) against the inverse computed on all positions at once."""
    model = _padim()
    model.begin_fit(30)
    model.update(_features(30, 2))
    scatter, count = model._scatter.clone(), model._count
    monkeypatch.setattr(model_padim, "POSITION_CHUNK_BYTES", 7 * 4 * 20 * 20)
    model.finalize()
    covariance = scatter / (count - 1)
    covariance.diagonal(dim1=1, dim2=2).add_(COVARIANCE_EPS)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
    assert torch.equal(model.inv_covariance, (inverse + inverse.mT) * 0.5)


def _config(root, tmp_path, **data) -> dict:
    return {"model": {"name": "padim", "backbone": "resnet18", "pretrained": False, "tile_ensemble": True},
            "data": {"name": "demo", "root": str(root), "image_size": IMAGE, "batch_size": 3,
                     "tile_size": TILE, "tile_stride": STRIDE, **data},
            "output_dir": str(tmp_path / "runs"), "eval": {"num_figures": 1}}


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, demo_root):
    """A tiled-ensemble PaDiM run (random weights, 64 px, 2×2 tiles of 48 overlapping; 3 images a call)."""
    return run_experiment(_config(demo_root, tmp_path_factory.mktemp("ensemble")))


def _crops(images: torch.Tensor, position: int) -> torch.Tensor:
    origin = tile_origins(IMAGE, IMAGE, TILE, STRIDE)[position]
    return torch.stack([cut(image, [origin], TILE)[0] for image in images])


def test_an_ensemble_run_fits_and_stitches_one_padim_per_tile_position(ensemble_run):
    """The run's Gaussians are those of untiled PaDiMs fitted on each tile position's crops of the training
    images; a test image's map is the brute-force stitch of those models' maps of its tiles; its threshold
    comes from leave-one-image-out scores."""
    results = ensemble_run
    assert results["metrics"]["threshold_calibration"]["images"] == "train/good, leave-one-image-out"
    modeler, _ = load_checkpoint(results["run_dir"], "cpu")
    loader = build_dataloader(modeler.config)
    train = torch.stack([loader.train_dataset[i]["image"] for i in range(len(loader.train_dataset))])
    test = torch.stack([loader.test_dataset[i]["image"] for i in range(2)])
    positions = modeler.model.mean.shape[0] // GROUPS
    references = []
    with torch.no_grad():
        for position in range(GROUPS):
            alone = PadimModel("resnet18", pretrained=False)  # the run's layers and feature count
            alone.load_state_dict({key: value for key, value in modeler.model.state_dict().items()
                                   if key.startswith("extractor.") or key == "feature_index"}, strict=False)
            alone.begin_fit(len(train))
            alone.update(_crops(train, position))
            alone.finalize()
            rows = slice(position * positions, (position + 1) * positions)
            np.testing.assert_allclose(modeler.model.mean[rows], alone.mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(modeler.model.inv_covariance[rows], alone.inv_covariance, rtol=1e-3,
                                       atol=1e-4 * float(alone.inv_covariance.abs().max()))
            references.append(alone)
        tiled = modeler.evaluate_step({"image": test})
        modeler.tiling_enabled = False
        for index, image in enumerate(test):
            tile_maps = []
            for position, alone in enumerate(references):
                modeler.model = alone
                tile_maps.append(modeler.evaluate_step({"image": _crops(image[None], position)})["anomaly_maps"][0, 0])
            expected = brute_force_stitch(torch.stack(tile_maps).numpy(), IMAGE, IMAGE, TILE, STRIDE)
            np.testing.assert_allclose(tiled["anomaly_maps"][index, 0].numpy(), expected, rtol=1e-3,
                                       atol=1e-4 * np.abs(expected).max())
            assert float(tiled["anomaly_scores"][index]) == pytest.approx(expected.max(), rel=1e-3)


def test_ensemble_scores_are_identical_cached_and_uncached(ensemble_run, demo_root, tmp_path):
    """Without any cache the images' tiles go through the backbone data.batch_size at a time before the
    model takes whole images: the same scores, map for map, as from the memory cache."""
    uncached = run_experiment({**_config(demo_root, tmp_path, cache=False),
                               "train": {"feature_cache_mb": 0, "feature_disk_cache_mb": 0}})
    reference = (Path(ensemble_run["run_dir"]) / "scores.csv").read_text()
    assert len(reference.splitlines()) > 10
    assert (Path(uncached["run_dir"]) / "scores.csv").read_text() == reference


def test_an_exported_ensemble_takes_each_image_s_tiles_together(ensemble_run, demo_root, tmp_path):
    pytest.importorskip("onnxruntime")
    from anomaly_framework.deploy.export import export
    from anomaly_framework.deploy.onnx_runner import OnnxDetector

    artifact = export(ensemble_run["run_dir"], "onnx", tmp_path / "model.onnx")
    sidecar = json.loads(Path(f"{artifact}.json").read_text())
    assert sidecar["input"]["tile_group"] == GROUPS and sidecar["export_check"]["labels_differing"] == 0
    assert sidecar["export_check"]["images"] == f"random uint8, batches of {GROUPS} and {3 * GROUPS}"
    detector = OnnxDetector(artifact)
    paths = sorted((Path(demo_root) / "fabric" / "test").rglob("*.png"))[:3]
    uint8 = np.stack([detector.load(path) for path in paths])
    maps, scores, _ = detector.detect(uint8, batch_size=3)  # 3 < 4 tiles: the runner sends an image's 4
    assert_runner_matches_eager(ensemble_run["run_dir"], uint8, maps, scores)

@pytest.mark.parametrize("data, fragment", [
    ({"image_size": 64}, "'model.tile_ensemble'=true needs data.tile_size"),
    ({"image_size": "native", "tile_size": 32}, "'model.tile_ensemble'=true needs the same tile positions in every image"),
])
def test_an_ensemble_without_one_tile_grid_is_a_one_line_error(data, fragment):
    with pytest.raises(FrameworkError) as error:
        resolve_config({"model": {"name": "padim", "tile_ensemble": True}, "data": data})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_ensemble_is_padim_s_default_on_one_tile_grid_only():
    """Default (None): on when tiled at a fixed image_size, off at native and untiled; a set value is kept."""
    def resolved(**data) -> bool:
        return resolve_config({"model": {"name": "padim"}, "data": data})["model"]["tile_ensemble"]
    assert resolved(image_size=448, tile_size=224) is True
    assert resolved(image_size="native", tile_size=224) is False
    assert resolved(image_size=448) is False
    assert resolve_config({"model": {"name": "padim", "tile_ensemble": False},
                           "data": {"image_size": 448, "tile_size": 224}})["model"]["tile_ensemble"] is False


def test_statistics_beyond_the_machine_s_memory_are_refused_before_they_are_allocated(monkeypatch):
    """4 tile positions × 64 grid positions × 20² floats, scatter and inverse: 0.8 MB; refused on a 0.5 MB
    machine in one line naming the way out, accepted on a 1 MB one."""
    ensemble = _padim(tile_ensemble=True)
    ensemble.begin_fit(2)
    ensemble.tile_positions = GROUPS
    monkeypatch.setattr(model_padim, "memory_bytes", lambda device: 2**19)
    with pytest.raises(FrameworkError) as error:
        ensemble.update(_features(2 * GROUPS, 3))
    message = str(error.value)
    assert "need 0.0 GB (256 Gaussians of 20 dimensions" in message and "model.tile_ensemble=false" in message
    assert "\n" not in message and ensemble._scatter is None
    monkeypatch.setattr(model_padim, "memory_bytes", lambda device: 2**20)
    ensemble.update(_features(2 * GROUPS, 3))
    assert ensemble._scatter.shape == (256, 20, 20)
