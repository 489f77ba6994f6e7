"""torchrun with 2 CPU processes (gloo) gives the single-process statistics and losses."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_padim import PACKED_KEY

ROOT = Path(__file__).resolve().parents[1]


def _flags(tmp_path, demo_root, model, *extra):
    return ["--model", model, "--dataset", "demo", "--category", "fabric", "--data-root", str(demo_root),
            "--backbone", "resnet18", "--image-size", "64", "--output-dir", str(tmp_path / "ddp"),
            "--set", "model.pretrained=false", "--set", "eval.num_figures=0", *extra]


def _torchrun(flags) -> Path:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "main.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    return Path(process.stdout.strip().splitlines()[-1])


def _scores(run_dir) -> dict[str, float]:
    with open(Path(run_dir) / "scores.csv") as handle:
        return {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}


def _single(tmp_path, demo_root, model, **extra):
    return run_experiment({"model.name": model, "data.name": "demo", "data.category": "fabric",
                           "data.root": str(demo_root), "model.backbone": "resnet18", "model.pretrained": False,
                           "data.image_size": 64, "eval.num_figures": 0, "output_dir": str(tmp_path / "one"), **extra})


def test_padim_statistics_from_two_processes_equal_one(tmp_path, demo_root):
    single = _single(tmp_path, demo_root, "padim")
    run_dir = _torchrun(_flags(tmp_path, demo_root, "padim"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["fit"]["train_images"] == single["fit"]["train_images"]
    one = torch.load(Path(single["run_dir"]) / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert torch.allclose(one["mean"], two["mean"], atol=1e-5)
    scale = one[PACKED_KEY].abs().max()  # the stored triangles of the inverse covariances
    assert torch.allclose(one[PACKED_KEY] / scale, two[PACKED_KEY] / scale, atol=1e-4)
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert expected.keys() == got.keys()
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())


def test_stfpm_first_epoch_loss_from_two_processes_equals_one(tmp_path, demo_root):
    # One global batch holding every training image: both runs see the same images in the first step;
    # they differ only in the student's batch-norm statistics (per rank of 16 vs 32 images).
    extra = {"train.epochs": 1, "data.batch_size": 32, "data.val_fraction": 0.2}
    single = _single(tmp_path, demo_root, "stfpm", **extra)
    flags = [item for key, value in extra.items() for item in ("--set", f"{key}={value}")]
    run_dir = _torchrun(_flags(tmp_path, demo_root, "stfpm", *flags))
    history = json.loads((run_dir / "results.json").read_text())["fit"]["history"]
    first = single["fit"]["history"][0]
    assert history[0]["train"]["loss"] == pytest.approx(first["train"]["loss"], rel=0.02)
    assert history[0]["valid"]["loss"] == pytest.approx(first["valid"]["loss"], rel=0.05)


def test_stfpm_with_an_efficientnet_student_trains_under_torchrun(tmp_path, demo_root):
    # timm's EfficientNet feature model keeps the blocks after the last matched stage; in the student
    # they get no gradient, which DistributedDataParallel refuses at the second step.
    flags = _flags(tmp_path, demo_root, "stfpm", "--set", "train.epochs=1", "--set", "data.batch_size=8")
    flags[flags.index("resnet18")] = "efficientnet_lite0"
    run_dir = _torchrun(flags)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["backbone"] == "efficientnet_lite0"
    assert results["fit"]["kept"] == "epoch 1 (best monitored)"
