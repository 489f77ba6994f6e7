"""Daily workflows: threshold strategies, sweeps with summaries, the benchmark report, and prediction on
new images."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.cli import main
from anomaly_framework.benchmarks.floors import run_benchmark, search_arithmetic_tflop
from anomaly_framework.main import run_experiment
from anomaly_framework.metrics.metrics_base import f1_adaptive_threshold
from anomaly_framework.inference.predict import predict
from anomaly_framework.factories import build_dataloader
from anomaly_framework.sweeps.sweep import run_sweep
from anomaly_framework.errors import FrameworkError

TINY = {"model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 64, "data.batch_size": 16,
        "eval.num_figures": 0}


def _overrides(tmp_path, demo_root, **extra):
    return {**TINY, "data.name": "demo", "data.root": str(demo_root), "output_dir": str(tmp_path / "runs"), **extra}


# -- thresholds ----------------------------------------------------------------------------------------
def test_f1_adaptive_refuses_a_validation_set_without_anomalies():
    with pytest.raises(FrameworkError, match="found 0 anomalous and 3 normal"):
        f1_adaptive_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert f1_adaptive_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.8)


def test_f1_adaptive_needs_a_labelled_split_and_records_it(tmp_path, demo_root):
    overrides = _overrides(tmp_path, demo_root, **{"model.name": "padim", "eval.threshold_strategy": "f1_adaptive"})
    with pytest.raises(FrameworkError, match="labelled_val_fraction"):
        run_experiment(overrides)
    full = run_experiment(_overrides(tmp_path, demo_root, **{"model.name": "padim"}))
    results = run_experiment({**overrides, "data.labelled_val_fraction": 0.3})
    metrics = results["metrics"]
    assert metrics["threshold_strategy"] == "f1_adaptive" and "labelled validation" in metrics["threshold_source"]
    held_out = int(metrics["threshold_source"].split("(")[1].split()[0])
    with open(Path(results["run_dir"]) / "scores.csv") as handle:
        tested = len(list(csv.DictReader(handle)))
    with open(Path(full["run_dir"]) / "scores.csv") as handle:
        assert tested + held_out == len(list(csv.DictReader(handle)))  # held-out images left the test metrics


def test_manual_threshold_and_its_refusal(tmp_path, demo_root):
    with pytest.raises(FrameworkError, match="threshold_value"):
        resolve_config({"eval.threshold_strategy": "manual"})
    with pytest.raises(FrameworkError, match="threshold_strategy"):
        resolve_config({"eval.threshold_strategy": "best"})
    results = run_experiment(_overrides(tmp_path, demo_root, **{"model.name": "padim", "eval.threshold_strategy": "manual",
                                                                 "eval.threshold_value": 3}))
    assert results["metrics"]["threshold"] == 3.0 and results["metrics"]["threshold_source"].startswith("manual")


# -- sweeps --------------------------------------------------------------------------------------------
def test_sweep_over_all_categories_and_seeds_writes_tables_and_skips_done(tmp_path, demo_root):
    overrides = _overrides(tmp_path, demo_root)
    sweep = run_sweep(overrides, ["padim"], ["all"], [0, 1])
    folder = Path(sweep["sweep_dir"])
    with open(folder / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 6 and {row["category"] for row in runs} == {"fabric", "tiles", "disc"}
    assert all(row["status"] == "ok" and Path(row["run_dir"]).is_dir() for row in runs)
    assert len({row["run_dir"] for row in runs}) == 6  # every run in its own folder
    with open(folder / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 3
    for row in summary:  # mean and (population) std over the two seeds' results.json
        values = [json.loads((Path(r["run_dir"]) / "results.json").read_text())["metrics"]["image_auroc"]
                  for r in runs if r["category"] == row["category"]]
        assert float(row["image_auroc_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(row["image_auroc_std"]) == pytest.approx(np.std(values), abs=1e-9)
    table = (folder / "summary.md").read_text()
    assert "| **mean** |" in table and "±" in table and (folder / "summary.png").stat().st_size > 0
    again = run_sweep(overrides, ["padim"], ["fabric"], [0], skip_done=True)
    assert again["rows"][0]["status"] == "skipped (done)" and again["rows"][0]["run_dir"] in {r["run_dir"] for r in runs}


def test_a_failing_combination_is_recorded_and_the_sweep_goes_on(tmp_path, demo_root):
    sweep = run_sweep(_overrides(tmp_path, demo_root), ["padim"], ["nowhere", "fabric"], [0])
    failed, ok = sweep["rows"]
    assert failed["status"] == "failed" and "nowhere" in failed["error"]
    assert ok["status"] == "ok" and ok["image_auroc"] is not None
    assert "failed" in (Path(sweep["sweep_dir"]) / "summary.md").read_text()


def test_cli_model_list_runs_a_sweep(tmp_path, demo_root, capsys):
    argv = ["--model", "padim,patchcore", "--dataset", "demo", "--category", "fabric", "--data-root", str(demo_root),
            "--backbone", "resnet18", "--image-size", "64", "--output-dir", str(tmp_path / "runs"),
            "--set", "model.pretrained=false", "--set", "eval.num_figures=0",
            "--set", "patchcore:model.coreset_ratio=0.5", "--set", "padim:model.n_features=7"]
    assert main(argv) == 0
    sweep_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    with open(sweep_dir / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["padim", "patchcore"]
    configs = [json.loads((Path(row["run_dir"]) / "config.json").read_text())["model"] for row in rows]
    assert configs[0]["n_features"] == 7 and "coreset_ratio" not in configs[0]
    assert configs[1]["coreset_ratio"] == 0.5 and "n_features" not in configs[1]


def test_category_all_over_a_root_without_categories_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--model", "padim", "--dataset", "mvtec", "--category", "all", "--data-root", str(tmp_path / "empty"),
            "--output-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "found no category folder under" in error[0] and str(tmp_path / "empty") in error[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("scoped, fragment", [
    ("stfpm:train.lr=0.1", "scoped to model 'stfpm', which is not run here (models: padim, patchcore)"),
    ("nosuch:model.x=1", "scoped to model 'nosuch', which is not run here"),
    (":model.x=1", "a per-model key reads MODEL:KEY"),
    ("patchcore:model.nosuch=1", "model.nosuch"),
])
def test_per_model_keys_that_fit_no_run_are_one_line(tmp_path, demo_root, capsys, scoped, fragment):
    argv = ["--model", "padim,patchcore", "--dataset", "demo", "--data-root", str(demo_root),
            "--output-dir", str(tmp_path / "runs"), "--set", scoped]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and fragment in error[0]
    assert not (tmp_path / "runs").exists()


def test_a_per_model_key_wins_over_the_plain_one():
    config = resolve_config({"model.name": "padim", "model.n_features": 9, "padim:model.n_features": 4,
                             "patchcore:model.coreset_ratio": 0.5})
    assert config["model"]["n_features"] == 4 and "coreset_ratio" not in config["model"]
    with pytest.raises(FrameworkError, match=r"Unknown model 'nosuch' \(nosuch:\.\.\.\)"):
        resolve_config({"model.name": "padim", "nosuch:model.x": 1})


# -- benchmark -----------------------------------------------------------------------------------------
def test_benchmark_sets_stage_timings_beside_their_floors(tmp_path, demo_root, capsys):
    overrides = _overrides(tmp_path, demo_root, **{"model.name": "patchcore", "model.coreset_ratio": 0.25})
    results = run_benchmark(overrides)
    report, fit, timings = results["benchmark"], results["fit"], results["timings"]
    dataloader = build_dataloader(resolve_config(overrides))
    train_images, test_images = len(dataloader.train_dataset), len(dataloader.test_dataset)
    assert report["images"] == train_images + test_images
    patches = train_images * (64 // 8) ** 2  # resnet18 layer 2: stride 8
    assert fit["bank_patches"] == int(patches * 0.25) and fit["coreset"]["steps"] == fit["bank_patches"]
    assert fit["coreset"]["bytes_per_step"] == patches * (128 + 1) * 4
    assert report["search_tflop"] == pytest.approx(2 * test_images * (64 // 8) ** 2 * fit["bank_patches"] * 1024 / 1e12)
    assert report["search_at_matmul_rate_s"] == pytest.approx(report["search_tflop"] * 1e3 / report["matmul_gflops"])
    assert report["all_but_coreset_over_backbone"] == pytest.approx(
        (timings["fit"] - timings["fit_coreset"] + timings["evaluate"]) / report["backbone_forward_s"])
    assert all(report[key] > 0 for key in ("backbone_forward_s", "copy_gb_per_s", "matmul_gflops", "coreset_gb_per_s"))
    assert json.loads((Path(results["run_dir"]) / "benchmark.json").read_text()) == pytest.approx(report)
    assert "matmul_gflops" in capsys.readouterr().out

    padim = run_benchmark(_overrides(tmp_path, demo_root, **{"model.name": "padim"}))["benchmark"]
    assert "search_tflop" not in padim and "coreset_gb_per_s" not in padim  # no bank, no coreset


def test_benchmark_search_estimate_counts_every_tile_s_patches(tmp_path, demo_root):
    """A tiled PatchCore searches each tile's patches: 3x3 tiles of 32 px (stride 16) on a 64-px image."""
    overrides = _overrides(tmp_path, demo_root, **{"model.name": "patchcore", "model.coreset_ratio": 0.25,
                                                   "data.tile_size": 32, "data.tile_stride": 16})
    results = run_experiment(overrides)
    test_images = len(build_dataloader(resolve_config(overrides)).test_dataset)
    fit = results["fit"]
    expected = 2 * test_images * 9 * (32 // 8) ** 2 * fit["bank_patches"] * 1024 / 1e12  # resnet18 layer 2: stride 8
    assert search_arithmetic_tflop(results["run_dir"], fit, test_images, results["config"]["data"]) == pytest.approx(expected)


def test_benchmark_refuses_torchrun(tmp_path, demo_root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FrameworkError, match="without torchrun"):
        run_benchmark(_overrides(tmp_path, demo_root, **{"model.name": "patchcore"}))
    monkeypatch.delenv("WORLD_SIZE")
    native = {"model.name": "patchcore", "data.image_size": "native", "data.tile_size": 32}
    with pytest.raises(FrameworkError, match="set data.image_size to a number"):
        run_benchmark(_overrides(tmp_path, demo_root, **native))


# -- prediction ----------------------------------------------------------------------------------------
def test_predict_reproduces_run_scores_and_skips_unreadable_files(tmp_path, demo_root, capsys):
    results = run_experiment(_overrides(tmp_path, demo_root, **{"model.name": "padim"}))
    test_dir = demo_root / "fabric" / "test"
    prediction = predict(results["run_dir"], test_dir, overlays=False)
    with open(Path(results["run_dir"]) / "scores.csv") as handle:
        expected = {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}
    predicted = {row["image_path"]: row["score"] for row in prediction["rows"]}
    assert predicted == expected  # exactly the run's scores
    threshold = prediction["threshold"]
    assert all(row["label"] == int(row["score"] >= threshold) for row in prediction["rows"])

    odd = tmp_path / "odd"
    odd.mkdir()
    source = next(test_dir.glob("*/*.png"))
    Image.open(source).convert("L").resize((90, 70)).save(odd / "gray.png")
    Image.open(source).convert("RGBA").save(odd / "rgba.png")
    (odd / "broken.png").write_bytes(b"not an image")
    assert main(["predict", "--checkpoint", results["run_dir"], "--input", str(odd)]) == 0
    captured = capsys.readouterr()
    out_dir = Path(captured.out.strip().splitlines()[-1])
    assert "broken.png" in captured.err and "broken.png" in (out_dir / "skipped.txt").read_text()
    with open(out_dir / "predictions.csv") as handle:
        assert sorted(Path(row["image_path"]).name for row in csv.DictReader(handle)) == ["gray.png", "rgba.png"]
    assert Image.open(out_dir / "gray_overlay.png").size == (90, 70)  # the original resolution
    shutil.rmtree(odd)
    assert main(["predict", "--checkpoint", results["run_dir"], "--input", str(odd)]) == 2
