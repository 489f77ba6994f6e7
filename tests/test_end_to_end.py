"""Whole runs on the generated demo data: every memory model, checkpoints, CLI and bad inputs."""
import csv
import json
from pathlib import Path

import pytest
import torch

from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.factories import build_dataloader

FAST_DATA = {"image_size": 64, "batch_size": 16}


def _config(tmp_path, demo_root, model, **model_overrides):
    return {
        "model": {"name": model, "backbone": "resnet18", "pretrained": False, **model_overrides},
        "data": {"name": "demo", "root": str(demo_root), **FAST_DATA},
        "output_dir": str(tmp_path / "runs"),
        "eval": {"num_figures": 2},
    }


@pytest.fixture(scope="module")
def padim_run(tmp_path_factory, demo_root):
    tmp_path = tmp_path_factory.mktemp("padim")
    return tmp_path, run_experiment(_config(tmp_path, demo_root, "padim"))


def test_padim_end_to_end_detects_demo_defects_with_random_backbone(padim_run):
    _, results = padim_run
    metrics = results["metrics"]
    assert metrics["image_auroc"] > 0.7
    assert metrics["pixel_auroc"] > 0.7
    assert results["pretrained"] is False and "random" in results["weights_source"]
    fit = results["fit"]  # the memory family's fit metrics: one Gaussian per layer-1 position (stride 4)
    assert fit["gaussians"] == (FAST_DATA["image_size"] // 4) ** 2 and fit["feature_dim"] == 100  # R18: Rd100
    # Means [P, d] and one triangle of each symmetric inverse covariance, float32.
    assert fit["fitted_mb"] == pytest.approx(fit["gaussians"] * (100 + 100 * 101 // 2) * 4 / 2**20, abs=1e-3)


def test_run_folder_holds_the_public_outputs(padim_run):
    _, results = padim_run
    run_dir = Path(results["run_dir"])
    saved = json.loads((run_dir / "results.json").read_text())
    for key in ("metrics", "timings", "peak_memory_mb", "backbone", "weights_source", "pretrained", "versions", "run_dir"):
        assert key in saved
    for key in ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "aupro", "image_f1_max", "threshold",
                "threshold_source", "accuracy", "precision", "recall", "f1"):
        assert key in saved["metrics"]
    for key in ("fit", "evaluate", "total", "images_per_second"):
        assert key in saved["timings"]
    assert "train/good" in saved["metrics"]["threshold_source"]
    assert json.loads((run_dir / "config.json").read_text())["model"]["name"] == "padim"
    assert (run_dir / "roc_curve.png").is_file()
    assert len(list((run_dir / "figures").glob("*.png"))) == 2


def _reloaded_scores(run_dir):
    """Test-split scores of a model rebuilt from its checkpoint alone, in test-loader order."""
    modeler, checkpoint = load_checkpoint(run_dir)
    loader = build_dataloader(checkpoint["config"]).test_loader()
    with torch.inference_mode():
        return torch.cat([modeler.evaluate_step(batch)["anomaly_scores"] for batch in loader])


def _run_scores(run_dir):
    with open(Path(run_dir) / "scores.csv") as handle:
        return torch.tensor([float(row["score"]) for row in csv.DictReader(handle)])


def test_reported_pixel_metrics_equal_those_of_the_checkpoint_maps(padim_run):
    """AU-PRO and pixel AUROC recomputed from the maps of the reloaded model and the test masks."""
    from sklearn.metrics import roc_auc_score

    from anomaly_framework.metrics.metrics_base import aupro

    _, results = padim_run
    modeler, checkpoint = load_checkpoint(results["run_dir"])
    maps, masks = [], []
    with torch.inference_mode():
        for batch in build_dataloader(checkpoint["config"]).test_loader():
            maps.append(modeler.evaluate_step(batch)["anomaly_maps"])
            masks.append(batch["mask"])
    maps, masks = torch.cat(maps)[:, 0].numpy(), torch.cat(masks)[:, 0].numpy() > 0.5
    assert results["metrics"]["aupro"] == pytest.approx(aupro(masks, maps), rel=1e-4)
    assert results["metrics"]["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-4)


def test_checkpoint_round_trip_gives_identical_scores(padim_run):
    _, results = padim_run
    torch.load(Path(results["run_dir"]) / "checkpoint.pt", weights_only=True)  # tensors and primitives only
    assert torch.allclose(_reloaded_scores(results["run_dir"]), _run_scores(results["run_dir"]), rtol=1e-5, atol=1e-5)


def test_patchcore_end_to_end(tmp_path, demo_root):
    results = run_experiment(_config(tmp_path, demo_root, "patchcore", coreset_ratio=0.25))
    assert results["metrics"]["image_auroc"] > 0.7
    assert results["metrics"]["pixel_auroc"] > 0.7
    modeler, _ = load_checkpoint(results["run_dir"])
    bank = modeler.model.memory_bank
    fit = results["fit"]  # the memory family's fit metrics
    train_patches = fit["train_images"] * (FAST_DATA["image_size"] // 8) ** 2  # layer-2 grid: stride 8
    assert (fit["bank_patches"], fit["bank_dim"]) == tuple(bank.shape) == (int(train_patches * 0.25), 1024)
    assert fit["fitted_mb"] == pytest.approx(bank.numel() * 4 / 2**20, abs=1e-3)
    assert fit["coreset"]["steps"] == bank.shape[0]
    assert torch.allclose(_reloaded_scores(results["run_dir"]), _run_scores(results["run_dir"]), rtol=1e-5, atol=1e-5)


def test_each_run_gets_its_own_folder(tmp_path, demo_root):
    config = _config(tmp_path, demo_root, "padim")
    first = run_experiment(config)["run_dir"]
    second = run_experiment(config)["run_dir"]
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


def test_cli_smoke_prints_run_folder_last(tmp_path, demo_root, capsys):
    code = main([
        "--model", "padim", "--dataset", "demo", "--data-root", str(demo_root), "--backbone", "resnet18",
        "--image-size", "64", "--batch-size", "16", "--output-dir", str(tmp_path / "runs"),
        "--set", "model.pretrained=false", "--set", "eval.num_figures=0",
    ])
    assert code == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(last_line).is_dir() and (Path(last_line) / "results.json").is_file()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "nosuch"], "Unknown model 'nosuch'"),
        (["--dataset", "nosuch"], "Unknown dataset 'nosuch'"),
        (["--set", "model.nosuch=1"], "model.nosuch"),
        (["--set", "data.batch_size=big"], "data.batch_size"),
        (["--dataset", "mvtec", "--data-root", "/nonexistent/mvtec"], "/nonexistent/mvtec"),
        (["--set", "model.pretrained=true", "--backbone", "resnet18"], "weights/resnet18.pth"),
    ],
)
def test_cli_bad_inputs_fail_with_one_line_and_touch_no_run(tmp_path, demo_root, capsys, argv, fragment, padim_run):
    _, results = padim_run
    before = sorted(p.name for p in Path(results["run_dir"]).iterdir())
    base = ["--model", "padim", "--output-dir", str(tmp_path / "runs"), "--set", "model.pretrained=false",
            "--backbone", "resnet18", "--data-root", str(demo_root)]
    code = main(base + argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(error) == 1 and fragment in error[0]
    assert sorted(p.name for p in Path(results["run_dir"]).iterdir()) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))


def test_checkpoint_that_does_not_fit_is_one_clear_line(tmp_path, padim_run, capsys):
    _, results = padim_run
    checkpoint = torch.load(Path(results["run_dir"]) / "checkpoint.pt", weights_only=True)
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.endswith("input_scale")}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")  # as an older version of the framework wrote it
    code = main(["predict", "--checkpoint", str(tmp_path), "--input", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert str(tmp_path / "checkpoint.pt") in error[0] and "input_scale" in error[0]
