"""The gradient trainer on STFPM: end to end, early stopping, resume equality and the NaN guard."""
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment
from anomaly_framework.modelers.modeler_stfpm import STFPMModeler
from anomaly_framework.factories import build_dataloader
from anomaly_framework.errors import FrameworkError


def _config(tmp_path, demo_root, **train):
    return {
        "model": {"name": "stfpm", "backbone": "resnet18", "pretrained": False},
        "data": {"name": "demo", "root": str(demo_root), "image_size": 64, "batch_size": 8, "val_fraction": 0.25},
        "train": {"epochs": 3, "lr": 0.05, **train},
        "output_dir": str(tmp_path / "runs"),
        "eval": {"num_figures": 1},
    }


def _scores(run_dir):
    with open(Path(run_dir) / "scores.csv") as handle:
        return torch.tensor([float(row["score"]) for row in csv.DictReader(handle)])


def test_stfpm_end_to_end_trains_and_keeps_the_best_checkpoint(tmp_path, demo_root, scores_auroc):
    results = run_experiment(_config(tmp_path, demo_root))
    history = results["fit"]["history"]
    assert len(history) == 3 and results["fit"]["monitored"] == "mean anomaly map of the held-out train images"
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]
    means = [epoch["valid"]["normal_map_mean"] for epoch in history]
    assert results["fit"]["best_monitored"] == min(means)
    assert results["fit"]["kept"] == f"epoch {means.index(min(means)) + 1} (best monitored)"
    # The official criterion, recomputed on the evaluated weights: the mean over the held-out images of
    # the product of the per-level distance maps, each resized to the finest level's grid.
    modeler, _ = load_checkpoint(results["run_dir"])
    dataloader = build_dataloader(results["config"])
    grids = []
    with torch.no_grad():
        for batch in dataloader.make_loader(dataloader.valid_dataset, shuffle=False):
            outputs = modeler.model(batch["image"])
            product = None
            for t, s in zip(outputs["teacher"], outputs["student"]):
                level = ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)
                grid = outputs["teacher"][0].shape[-2:]
                level = F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
                product = level if product is None else product * level
            grids.append(product)
    assert results["fit"]["best_monitored"] == pytest.approx(float(torch.cat(grids).mean()), rel=1e-5)
    # The weights are stored once: checkpoint.pt holds the best epoch; training files go once the run is done.
    assert sorted(p.name for p in Path(results["run_dir"]).glob("*.pt")) == ["checkpoint.pt"]
    assert results["metrics"]["image_auroc"] == pytest.approx(scores_auroc(results["run_dir"]), abs=1e-9)


def test_early_stopping_triggers_on_a_plateau(tmp_path, demo_root):
    # No epoch can beat the first by min_delta: a plateau by construction.
    results = run_experiment(_config(tmp_path, demo_root, epochs=10, patience=2, min_delta=1e6))
    assert results["fit"]["stopped_early"] is True
    assert results["fit"]["epochs"] == 3  # the first epoch sets the best, two more without improvement


def test_resume_equals_uninterrupted_training(tmp_path, demo_root, interrupt_training):
    uninterrupted = run_experiment(_config(tmp_path / "a", demo_root))
    interrupt_training(3)  # after two completed epochs
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(tmp_path / "b", demo_root))
    interrupt_training(None)
    interrupted_dir = next((tmp_path / "b" / "runs").rglob("last.pt")).parent
    resumed = run_experiment(_config(tmp_path / "b", demo_root, resume=str(interrupted_dir)))
    assert resumed["fit"]["epochs"] == 3
    assert [e["train"]["loss"] for e in resumed["fit"]["history"]] == pytest.approx(
        [e["train"]["loss"] for e in uninterrupted["fit"]["history"]], rel=1e-5)
    assert torch.allclose(_scores(resumed["run_dir"]), _scores(uninterrupted["run_dir"]), rtol=1e-4, atol=1e-6)


def test_resume_keeps_a_best_epoch_from_before_the_interruption(tmp_path, demo_root):
    first = run_experiment(_config(tmp_path, demo_root, epochs=1, keep_training_state=True))
    assert not (Path(first["run_dir"]) / "best.pt").exists()  # a done run keeps its best weights in checkpoint.pt
    # No resumed epoch can count as better (min_delta is huge): the best checkpoint is the first run's.
    resumed = run_experiment(_config(tmp_path, demo_root, epochs=2, min_delta=1e9, resume=first["run_dir"]))
    assert resumed["fit"]["epochs"] == 2 and resumed["fit"]["best_monitored"] == pytest.approx(first["fit"]["best_monitored"])
    assert torch.allclose(_scores(resumed["run_dir"]), _scores(first["run_dir"]), rtol=1e-5, atol=1e-6)


def test_resume_from_a_training_state_of_an_older_version_names_the_file(tmp_path, demo_root):
    first = run_experiment(_config(tmp_path, demo_root, epochs=1, keep_training_state=True))
    last = Path(first["run_dir"]) / "last.pt"
    state = torch.load(last, weights_only=True)
    state["best_loss"] = state.pop("best_monitored")  # the key before train.monitor existed
    torch.save(state, last)
    with pytest.raises(FrameworkError, match=r"last\.pt.*best_monitored.*older version"):
        run_experiment(_config(tmp_path, demo_root, epochs=2, resume=first["run_dir"]))


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path, demo_root, monkeypatch):
    original = STFPMModeler.compute_loss
    steps = {"count": 0}

    def nan_on_seventh_step(self, outputs, batch):
        losses = original(self, outputs, batch)
        if torch.is_grad_enabled():  # optimiser steps only: validation also runs in training mode
            steps["count"] += 1
            if steps["count"] == 7:
                return {"loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(STFPMModeler, "compute_loss", nan_on_seventh_step)
    with pytest.raises(FrameworkError, match=r"epoch 2, step 3: loss became nan.*last\.pt"):
        run_experiment(_config(tmp_path, demo_root))
    last = torch.load(next((tmp_path / "runs").rglob("last.pt")), weights_only=True)
    assert last["epoch"] == 1
