"""``data.image_size=native`` (issue 26): every file read at its own, non-square size and cut on its own
tile grid. End to end (PaDiM, STFPM) each test map has its file's shape and is the brute-force stitch of the
model's own untiled maps of that image's tiles; leave-one-tile-out positions follow each image's own tile
count; cached = uncached scores; the ONNX runner = the eager model; ``predict`` = the run's evaluation; and
the one-line errors."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.cli import build_parser, overrides_from_args
from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.images.tiling import cut, tile_origins
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.inference.predict import predict
from anomaly_framework.main import run_experiment
from tests.test_tiling import brute_force_stitch

TILE, STRIDE = 32, 24  # overlapping tiles, uneven edges on every side below
SIZES = [(96, 64), (80, 112)]  # (width, height) of the files: two non-square sizes


def _image(rng: np.random.Generator, size: tuple[int, int], defect: bool = False) -> Image.Image:
    """A smooth normal texture (noise on a gradient); a defect is a bright square."""
    width, height = size
    base = np.linspace(60, 160, width)[None, :, None] + rng.normal(0, 12, (height, width, 3))
    if defect:
        base[height // 3:height // 3 + 10, width // 3:width // 3 + 10] = 255
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ (3 images of each size), test/good (one each), test/bad (one each, with masks)."""
    root = tmp_path_factory.mktemp("native_data")
    rng = np.random.default_rng(0)
    for name in ("train", "good", "bad", "masks"):
        (root / name).mkdir()
    for index in range(6):
        _image(rng, SIZES[index % 2]).save(root / "train" / f"{index}.png")
    for index, size in enumerate(SIZES):
        _image(rng, size).save(root / "good" / f"{index}.png")
        _image(rng, size, defect=True).save(root / "bad" / f"{index}.png")
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[size[1] // 3:size[1] // 3 + 10, size[0] // 3:size[0] // 3 + 10] = 255
        Image.fromarray(mask).save(root / "masks" / f"{index}.png")
    return root


def _config(root: Path, out: Path, name: str, **data) -> dict:
    config = {"model": {"name": name, "backbone": "resnet18", "pretrained": False},
              "data": {"name": "folder", "root": str(root), "train_dir": "train", "test_normal_dir": "good",
                       "test_abnormal_dir": "bad", "mask_dir": "masks", "image_size": "native", "batch_size": 4,
                       "tile_size": TILE, "tile_stride": STRIDE, **data},
              "output_dir": str(out), "eval": {"num_figures": 2}}
    if name == "stfpm":
        config["train"] = {"epochs": 1}
    return config


@pytest.fixture(scope="module")
def native_runs(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("native_runs")
    return {name: run_experiment(_config(folder, out, name)) for name in ("padim", "stfpm")}


def _scores(run_dir: str) -> dict[str, float]:
    with (Path(run_dir) / "scores.csv").open() as handle:
        return {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}


@pytest.mark.parametrize("name", ["padim", "stfpm"])
def test_native_maps_have_each_files_shape_and_stitch_the_models_own_tile_maps(native_runs, name):
    results = native_runs[name]
    assert results["pixel_resolution"].startswith("native") and results["metrics"]["pixel_auroc"] is not None
    assert len(list((Path(results["run_dir"]) / "figures").glob("*.png"))) == 2
    modeler, _ = load_checkpoint(results["run_dir"], "cpu")
    dataset = build_dataloader(modeler.config).test_dataset
    items = [dataset[index] for index in range(len(dataset))]
    run_scores = _scores(results["run_dir"])
    with torch.no_grad():
        tiled = modeler.evaluate_step({"image": [item["image"] for item in items]})
        modeler.tiling_enabled = False
        for item, stitched, score in zip(items, tiled["anomaly_maps"], tiled["anomaly_scores"]):
            height, width = Image.open(item["image_path"]).size[::-1]
            assert tuple(stitched.shape) == (1, height, width) and tuple(item["mask"].shape) == (1, height, width)
            tiles = torch.stack(cut(item["image"], tile_origins(height, width, TILE, STRIDE), TILE))
            tile_maps = modeler.evaluate_step({"image": tiles})["anomaly_maps"][:, 0].numpy()
            expected = brute_force_stitch(tile_maps, height, width, TILE, STRIDE)
            np.testing.assert_allclose(stitched[0].numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
            assert float(score) == pytest.approx(expected.max(), rel=1e-5)
            # The run's evaluation (cached features for PaDiM, image batches for STFPM) scored it the same.
            assert run_scores[item["image_path"]] == pytest.approx(expected.max(), rel=1e-5)


def test_leave_one_tile_out_uses_each_images_own_tile_count(folder, tmp_path):
    """PatchCore's threshold pass scores image p's tile k without the bank rows of fit position (tiles of the
    images before p) + k: its held-out maps equal the stitch of each tile scored by the same model whose
    bank lacks exactly that tile's rows (brute force), for images after ones of the other size."""
    config = _config(folder, tmp_path, "patchcore")
    config["model"]["coreset_ratio"] = 1.0
    config = resolve_config(config)
    dataloader = build_dataloader(config)
    modeler = build_modeler(config, build_model(config))
    trainer = build_trainer(config, modeler, dataloader, tmp_path / "run", torch.device("cpu"))
    trainer.fit()
    predictions, split = trainer.normal_predictions()
    assert split == "train/good, leave-one-tile-out"
    train = dataloader.train_dataset
    images = [train[index]["image"] for index in range(len(train))]
    grids = [tile_origins(*image.shape[-2:], TILE, STRIDE) for image in images]
    first = np.cumsum([0] + [len(grid) for grid in grids])
    model, bank, source = modeler.model, modeler.model.memory_bank, modeler.model.bank_source
    modeler.tiling_enabled = False
    for index in (1, len(images) - 1):
        tile_maps = []
        for tile, patch in enumerate(cut(images[index], grids[index], TILE)):
            keep = source != first[index] + tile
            model.memory_bank, model.bank_source = bank[keep], source[keep]
            with torch.no_grad():
                tile_maps.append(modeler.evaluate_step({"image": patch[None]})["anomaly_maps"][0, 0].numpy())
        height, width = images[index].shape[-2:]
        expected = brute_force_stitch(np.stack(tile_maps), height, width, TILE, STRIDE)
        np.testing.assert_allclose(predictions.maps[index][0].numpy(), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())


def test_cached_and_uncached_native_features_give_identical_scores(native_runs, folder, tmp_path):
    """PaDiM native: the first run (memory cache, disk cache written), a rerun (disk cache read) and a run
    without any cache give the same scores.csv, byte for byte."""
    reference = (Path(native_runs["padim"]["run_dir"]) / "scores.csv").read_text()
    again = run_experiment(_config(folder, tmp_path, "padim"))
    uncached = run_experiment({**_config(folder, tmp_path, "padim", cache=False),
                               "train": {"feature_cache_mb": 0, "feature_disk_cache_mb": 0}})
    assert len(reference.splitlines()) == 5
    assert (Path(again["run_dir"]) / "scores.csv").read_text() == reference
    assert (Path(uncached["run_dir"]) / "scores.csv").read_text() == reference


def test_onnx_runner_reads_native_images_and_equals_the_eager_model(native_runs, folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from anomaly_framework.deploy.export import export
    from anomaly_framework.deploy.onnx_runner import OnnxDetector

    run_dir = native_runs["stfpm"]["run_dir"]
    artifact = export(run_dir, "onnx", tmp_path / "model.onnx")
    sidecar = json.loads(Path(f"{artifact}.json").read_text())["input"]
    assert (sidecar["image_size"], sidecar["resize"], sidecar["shape"]) == ("native", None, ["batch", TILE, TILE, 3])
    detector = OnnxDetector(artifact)
    paths = [folder / "bad" / "0.png", folder / "bad" / "1.png"]
    uint8 = [detector.load(path) for path in paths]
    assert [image.shape[:2] for image in uint8] == [size[::-1] for size in SIZES]
    maps, scores, labels = detector.detect(uint8, batch_size=3)
    modeler, saved = load_checkpoint(run_dir, "cpu")
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    images = [(torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std for image in uint8]
    with torch.no_grad():
        eager = modeler.evaluate_step({"image": images})
    for got, reference in zip(maps, eager["anomaly_maps"]):
        reference = reference[0].numpy()
        np.testing.assert_allclose(got, reference, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(scores, eager["anomaly_scores"].numpy(), rtol=1e-4)
    assert labels.tolist() == [int(float(s) >= saved["threshold"]) for s in eager["anomaly_scores"]]


def test_predict_scores_a_non_square_file_as_the_run_did(native_runs, folder, tmp_path):
    run_dir = native_runs["padim"]["run_dir"]
    path = folder / "bad" / "1.png"
    result = predict(run_dir, path, tmp_path / "out")
    assert result["rows"][0]["score"] == pytest.approx(_scores(run_dir)[str(path)], rel=1e-5)
    assert Image.open(tmp_path / "out" / "1_overlay.png").size[0] == SIZES[1][0]


def test_native_is_accepted_from_the_cli_and_set():
    for argv in (["--image-size", "native"], ["--set", "data.image_size=native"]):
        assert overrides_from_args(build_parser().parse_args(argv))["data.image_size"] == "native"


@pytest.mark.parametrize("data, fragment", [
    ({"image_size": "native"}, "'data.image_size'=native needs data.tile_size"),
    ({"image_size": "native", "tile_size": 32, "mask_size": 64}, "'data.mask_size'=64 does not apply"),
    ({"image_size": "big", "tile_size": 32}, "'data.image_size' must be int"),
    ({"image_size": "native", "tile_size": 32, "monitor": "synthetic_pixel_auroc"}, "needs square images"),
])
def test_bad_native_settings_are_one_line_errors(data, fragment):
    train = {"monitor": data.pop("monitor")} if "monitor" in data else {}
    with pytest.raises(FrameworkError) as error:
        resolve_config({"model": {"name": "stfpm"}, "data": data, "train": train})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_an_image_smaller_than_a_tile_is_refused_naming_it(folder, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for name in ("0.png", "1.png"):
        (small / name).write_bytes((folder / "train" / name).read_bytes())
    _image(np.random.default_rng(1), (40, 20)).save(small / "2.png")
    config = _config(folder, tmp_path, "padim")
    config["data"]["train_dir"] = str(small)
    with pytest.raises(FrameworkError) as error:
        build_dataloader(resolve_config(config))
    message = str(error.value)
    assert f"'{small / '2.png'}' is 40x20, smaller than data.tile_size=32" in message and "\n" not in message


def test_native_patchcore_under_torchrun_scores_and_calibrates_as_in_one_process(folder, tmp_path):
    """Two ranks fit shards whose images hold different numbers of tiles; rank 0 merges the whole bank
    (coreset 1) and scores leave-one-tile-out at the global tile positions: the threshold and the test
    scores of one process."""
    from tests.test_distributed import _torchrun

    single = run_experiment({**_config(folder, tmp_path / "one", "patchcore"),
                             "model": {"name": "patchcore", "backbone": "resnet18", "pretrained": False,
                                       "coreset_ratio": 1.0}})
    flags = ["--model", "patchcore", "--backbone", "resnet18", "--dataset", "folder", "--data-root", str(folder),
             "--train-dir", "train", "--test-normal-dir", "good", "--test-abnormal-dir", "bad", "--mask-dir", "masks",
             "--image-size", "native", "--batch-size", "4", "--output-dir", str(tmp_path / "ddp"),
             *[flag for key in ("model.pretrained=false", "model.coreset_ratio=1.0", f"data.tile_size={TILE}",
                                f"data.tile_stride={STRIDE}", "eval.num_figures=0") for flag in ("--set", key)]]
    run_dir = _torchrun(flags)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["fit"]["bank_patches"] == single["fit"]["bank_patches"]
    assert results["metrics"]["threshold"] == pytest.approx(single["metrics"]["threshold"], rel=1e-4)
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert expected.keys() == got.keys()
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())
