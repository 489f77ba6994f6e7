"""Rebuilding a run's modeler from its checkpoint alone, for ``predict``, ``export`` and benchmarks."""
from __future__ import annotations

import copy
from pathlib import Path

from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_model, build_modeler, load_plugins
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.trainers.checkpoint_files import CHECKPOINT_NAME, read_checkpoint
from anomaly_framework.utils import resolve_device


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[BaseModeler, dict]:
    """Rebuilds the modeler of a run from its checkpoint alone (no backbone download needed).

    Returns the modeler (on ``device``, in eval mode) and the checkpoint dict (config, threshold...).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FrameworkError(f"Checkpoint '{path}' not found (give a run folder or its checkpoint.pt)")
    checkpoint = read_checkpoint(path, "cpu", needs=("model", "config", "threshold"))
    config = copy.deepcopy(checkpoint["config"])
    load_plugins(config.get("plugins", []))  # a plugin model is rebuilt by its own module
    if "pretrained" in config["model"]:
        config["model"]["pretrained"] = False  # every weight is in the checkpoint
    modeler = build_modeler(config, build_model(config))
    modeler.load_state_dict(checkpoint["model"], source=str(path))
    modeler.to(resolve_device(device)).model.eval()
    return modeler, checkpoint
