"""torchrun with 2 CPU processes (gloo): the single-process statistics, losses and scores, for every model
(and a backbone other than the default), alone and in a sweep."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_padim import PACKED_KEY

ROOT = Path(__file__).resolve().parents[1]


def _flags(tmp_path, demo_root, model, *extra, backbone="resnet18"):
    """torchrun's flags; ``backbone=None`` for the models without one."""
    with_backbone = ["--backbone", backbone, "--set", "model.pretrained=false"] if backbone else []
    return ["--model", model, "--dataset", "demo", "--category", "fabric", "--data-root", str(demo_root),
            *with_backbone, "--image-size", "64", "--output-dir", str(tmp_path / "ddp"),
            "--set", "eval.num_figures=0", *extra]


def _torchrun(flags) -> Path:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "main.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-4000:]
    return Path(process.stdout.strip().splitlines()[-1])


def _two_nodes(flags) -> Path:
    """Two ``torchrun`` node launches of one process each, meeting at a c10d rendezvous on localhost, as two
    machines meet at the first one's address (docs/usage.md). The node that gets rank 0 prints the folder."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-nodes",
               str(ROOT / "main.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    printed = [out.strip().splitlines()[-1] for out, _ in outputs if out.strip()]
    assert len(printed) == 1, printed  # rank 0 alone writes and prints
    return Path(printed[0])


def _scores(run_dir) -> dict[str, float]:
    with open(Path(run_dir) / "scores.csv") as handle:
        return {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}


def _single(tmp_path, demo_root, model, backbone="resnet18", **extra):
    return run_experiment({"model.name": model, "data.name": "demo", "data.category": "fabric",
                           "data.root": str(demo_root), "model.backbone": backbone, "model.pretrained": False,
                           "data.image_size": 64, "eval.num_figures": 0, "output_dir": str(tmp_path / "one"), **extra})


# resnet18: a random subset of 100 channels; Lite0: all 176, whose covariance from the 40 demo images is of
# rank at most 39 plus PaDiM's 0.01·I, so its inverse amplifies float32 rounding tenfold (its scores do not).
@pytest.mark.parametrize("backbone, inverse_tolerance, launch", [("resnet18", 1e-4, _torchrun),
                                                                 ("efficientnet_lite0", 1e-3, _torchrun),
                                                                 ("resnet18", 1e-4, _two_nodes)])
def test_padim_statistics_from_two_processes_equal_one(tmp_path, demo_root, backbone, inverse_tolerance, launch):
    single = _single(tmp_path, demo_root, "padim", backbone=backbone)
    run_dir = launch(_flags(tmp_path, demo_root, "padim", backbone=backbone))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["backbone"] == backbone
    assert results["fit"]["train_images"] == single["fit"]["train_images"]
    one = torch.load(Path(single["run_dir"]) / "checkpoint.pt", weights_only=True)["model"]
    two = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert torch.allclose(one["mean"], two["mean"], atol=1e-5)
    scale = one[PACKED_KEY].abs().max()  # the stored triangles of the inverse covariances
    assert torch.allclose(one[PACKED_KEY] / scale, two[PACKED_KEY] / scale, atol=inverse_tolerance)
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert expected.keys() == got.keys()
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())


@pytest.mark.parametrize("launch", [_torchrun, _two_nodes])
def test_stfpm_first_epoch_loss_from_two_processes_equals_one(tmp_path, demo_root, launch):
    # One global batch holding every training image: both runs see the same images in the first step;
    # they differ only in the student's batch-norm statistics (per rank of 16 vs 32 images).
    extra = {"train.epochs": 1, "data.batch_size": 32, "data.val_fraction": 0.2}
    single = _single(tmp_path, demo_root, "stfpm", **extra)
    flags = [item for key, value in extra.items() for item in ("--set", f"{key}={value}")]
    run_dir = launch(_flags(tmp_path, demo_root, "stfpm", *flags))
    history = json.loads((run_dir / "results.json").read_text())["fit"]["history"]
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
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


def _check_run(run_dir, demo_root, scores_auroc) -> dict:
    """A two-process run's record: world size 2, every test image scored exactly once on rank 0, and the
    reported image AUROC that of those scores. Returns results.json."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    assert results["world_size"] == 2
    with open(Path(run_dir) / "scores.csv") as handle:
        scored = [row["image_path"] for row in csv.DictReader(handle)]
    assert sorted(scored) == sorted(str(path) for path in (demo_root / "fabric" / "test").rglob("*.png"))
    assert results["metrics"]["image_auroc"] == pytest.approx(scores_auroc(run_dir), abs=1e-12)
    return results


def test_patchcore_with_its_whole_bank_scores_under_torchrun_as_in_one_process(tmp_path, demo_root, scores_auroc):
    # The whole bank (coreset_ratio 1) does not depend on the order the ranks gather their patches in.
    single = _single(tmp_path, demo_root, "patchcore", backbone="efficientnet_lite0", **{"model.coreset_ratio": 1.0})
    run_dir = _torchrun(_flags(tmp_path, demo_root, "patchcore", "--set", "model.coreset_ratio=1.0",
                               backbone="efficientnet_lite0"))
    results = _check_run(run_dir, demo_root, scores_auroc)
    assert results["backbone"] == "efficientnet_lite0"
    assert results["fit"]["bank_patches"] == single["fit"]["bank_patches"]
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())


def test_dfm_scores_under_torchrun_as_in_one_process(tmp_path, demo_root, scores_auroc):
    # The ranks' image vectors are gathered in rank order, so the PCA sees the single process's matrix.
    extra = {"model.layers": [2]}  # resnet18's layer3 at 64 px is 4×4, one cell after pooling by 4
    single = _single(tmp_path, demo_root, "dfm", **extra)
    run_dir = _torchrun(_flags(tmp_path, demo_root, "dfm", "--set", "model.layers=[2]"))
    _check_run(run_dir, demo_root, scores_auroc)
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())


@pytest.mark.parametrize("ensemble", [False, True], ids=["shared", "tile_ensemble"])
def test_tiled_padim_under_torchrun_scores_as_in_one_process(tmp_path, demo_root, scores_auroc, ensemble):
    # Overlapping 32-px tiles of the 64-px images (3 × 3 per image): the ranks fit one Gaussian set from every
    # tile of their shards (the ensemble: one per tile position, from whole images), rank 0 stitches and scores.
    tiles = {"data.tile_size": 32, "data.tile_stride": 16, "model.tile_ensemble": ensemble}
    single = _single(tmp_path, demo_root, "padim", **tiles)
    run_dir = _torchrun(_flags(tmp_path, demo_root, "padim", *[f for key, value in tiles.items()
                                                              for f in ("--set", f"{key}={str(value).lower()}")]))
    results = _check_run(run_dir, demo_root, scores_auroc)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["tile_size"] == 32 and config["model"]["tile_ensemble"] is ensemble
    assert results["fit"]["train_images"] == single["fit"]["train_images"]
    expected, got = _scores(single["run_dir"]), _scores(run_dir)
    assert expected.keys() == got.keys()
    assert all(got[key] == pytest.approx(value, rel=1e-4) for key, value in expected.items())


# Batch 8 = 4 per rank: several optimiser steps per epoch, as DistributedDataParallel refuses a parameter
# without a gradient only at the step after the one that left it out.
GRADIENT_CASES = {
    "fastflow": ["--backbone", "efficientnet_lite0", "--set", "model.pretrained=false"],  # default: resnet18
    # CFlow's gradients are averaged over the ranks by hand, per fiber batch (its steps bypass DDP).
    "cflow": ["--backbone", "efficientnet_lite0", "--set", "model.pretrained=false", "--set", "model.coupling_blocks=2",
              "--set", "model.fiber_batch=16"],
    "draem": ["--set", "model.reconstructive_width=8", "--set", "model.discriminative_width=8"],
    **{name: ["--backbone", "efficientnet_lite0", "--set", "model.pretrained=false"]  # defaults: WR50
       for name in ("reverse_distillation", "simplenet", "supersimplenet")},
}


@pytest.mark.parametrize("model", sorted(GRADIENT_CASES))
def test_gradient_models_train_under_torchrun(tmp_path, demo_root, scores_auroc, model):
    flags = _flags(tmp_path, demo_root, model, "--epochs", "1", "--batch-size", "8", *GRADIENT_CASES[model],
                   backbone=None)
    results = _check_run(_torchrun(flags), demo_root, scores_auroc)
    assert results["fit"]["epochs"] == 1


def test_a_sweep_of_the_reconstruction_models_under_torchrun(tmp_path, demo_root, scores_auroc):
    # One launch for the four models: the sweep joins the process group once and keeps it for every run.
    models = ["ae", "unet_ae", "vae", "unet_vae"]
    flags = _flags(tmp_path, demo_root, ",".join(models), "--epochs", "1", "--batch-size", "8",
                   "--set", "model.base_channels=8", backbone=None)
    sweep_dir = _torchrun(flags)
    assert [path.name for path in (tmp_path / "ddp" / "sweeps" / "demo").iterdir()] == [sweep_dir.name]  # rank 0's
    with open(sweep_dir / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["model"], row["status"]) for row in rows] == [(model, "ok") for model in models]
    for row in rows:
        results = _check_run(row["run_dir"], demo_root, scores_auroc)
        assert float(row["image_auroc"]) == results["metrics"]["image_auroc"]
