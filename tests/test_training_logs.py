"""Training logs of epoch-trained runs: history.csv as epochs end (kept by an interrupted run, continued by
its resumption), the learning rate the scheduler set, TensorBoard scalars, training_curves.png."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.main import run_experiment
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.trainers.training_log import HISTORY_NAME, TrainingLog, read_history
from anomaly_framework.errors import FrameworkError

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _config(output, demo_root, **extra):
    return {"model.name": "stfpm", "model.backbone": "resnet18", "model.pretrained": False, "data.name": "demo",
            "data.root": str(demo_root), "data.image_size": 32, "data.batch_size": 8, "data.val_fraction": 0.25,
            "train.epochs": 3, "train.lr": 0.05, "train.scheduler": "multistep", "train.milestones": [0.34],
            "train.gamma": 0.1, "train.tensorboard": HAS_TENSORBOARD, "output_dir": str(output),
            "eval.num_figures": 0, **extra}


def test_history_is_written_as_epochs_end_and_continued_on_resume(tmp_path, demo_root, interrupt_training):
    interrupt_training(3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_config(tmp_path, demo_root))
    interrupted = next(tmp_path.rglob(HISTORY_NAME)).parent
    assert [row["epoch"] for row in read_history(interrupted / HISTORY_NAME)] == [1, 2]
    interrupt_training(None)

    results = run_experiment(_config(tmp_path, demo_root, **{"train.resume": str(interrupted)}))
    run_dir, history = Path(results["run_dir"]), results["fit"]["history"]
    rows = read_history(run_dir / HISTORY_NAME)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row, entry in zip(rows, history):
        assert row["train_loss"] == pytest.approx(entry["train"]["loss"], rel=1e-12)
        assert row["valid_loss"] == pytest.approx(entry["valid"]["loss"], rel=1e-12)
        assert row["seconds"] == pytest.approx(entry["seconds"], rel=1e-12) and row["seconds"] > 0
    # MultiStepLR at floor(0.34 * 3) = epoch 1: the rate each epoch trained with.
    assert [row["lr"] for row in rows] == pytest.approx([0.05, 0.005, 0.005], rel=1e-12)
    # One 500 x 360 px panel per logged quantity (train and valid share one), up to three a row.
    quantities = {key.split("_", 1)[1] if key.startswith(("train_", "valid_")) else key
                  for key in rows[0] if key not in ("epoch", "seconds")}
    assert {"loss", "lr"} <= quantities
    assert Image.open(run_dir / "training_curves.png").size == (500 * min(3, len(quantities)),
                                                                 360 * -(-len(quantities) // 3))
    assert (run_dir / "tensorboard").is_dir() == HAS_TENSORBOARD


def _entries():
    return [{"epoch": 1, "train": {"loss": 2.0, "psnr": 10.0}, "valid": {"loss": 2.5}, "lr": 0.1, "seconds": 1.5},
            {"epoch": 2, "train": {"loss": 1.0, "psnr": 12.0}, "valid": {"loss": 1.5}, "lr": 0.01, "seconds": 1.25}]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the optional tensorboard package is not installed")
def test_tensorboard_scalars_equal_the_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TrainingLog(tmp_path, tensorboard=True)
    entries = _entries()
    log.record(entries[:1])
    log.record(entries)
    log.close(entries)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {"train/loss": [2.0, 1.0], "train/psnr": [10.0, 12.0], "valid/loss": [2.5, 1.5], "lr": [0.1, 0.01],
                "seconds": [1.5, 1.25]}
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, values in expected.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2] and [s.value for s in scalars] == pytest.approx(values, rel=1e-6)
    assert read_history(tmp_path / HISTORY_NAME) == [
        {"epoch": 1, "train_loss": 2.0, "train_psnr": 10.0, "valid_loss": 2.5, "lr": 0.1, "seconds": 1.5},
        {"epoch": 2, "train_loss": 1.0, "train_psnr": 12.0, "valid_loss": 1.5, "lr": 0.01, "seconds": 1.25}]
    assert Image.open(tmp_path / "training_curves.png").size == (1500, 360)  # panels: loss, psnr, lr


def test_tensorboard_asked_for_but_missing_is_one_line(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(FrameworkError, match=r"train.tensorboard=true needs the tensorboard package: pip install"):
        resolve_config({"model.name": "stfpm", "train.tensorboard": True})
    resolve_config({"model.name": "stfpm"})  # not asked for: no error
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it now fails
    with pytest.raises(FrameworkError, match="needs the tensorboard package"):
        TrainingLog(tmp_path, tensorboard=True)


def test_a_one_epoch_multistep_run_trains_at_the_configured_rate():
    # floor(0.8 · 1) = 0 would put both decays before the first step (lr · 0.4² from the start).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BaseModeler._scheduler(optimizer, {"scheduler": "multistep", "epochs": 1, "milestones": [0.8, 0.9],
                                                   "gamma": 0.4})
    assert optimizer.param_groups[0]["lr"] == 0.1 and scheduler.milestones == {1: 2}
