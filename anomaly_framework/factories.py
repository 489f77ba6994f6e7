"""The registry factories: a resolved config in, the run's dataloader, model, modeler, metrics and trainer out.

Importing this module imports every built-in package, so their registrations have run before any lookup
(and before a plugin registers beside them).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomaly_framework import dataloaders, metrics, modelers, models, trainers
from anomaly_framework.backbones.extractors import use_backbone_runtime
from anomaly_framework.backbones.runtimes import check_runtime
from anomaly_framework.dataloaders.dataloader_base import BaseDataloader
from anomaly_framework.dataloaders.image_cache import cache_root
from anomaly_framework.errors import FrameworkError
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import (DATALOADER_REGISTRY, METRICS_REGISTRY, MODEL_REGISTRY, MODELER_REGISTRY,
                                        TRAINER_REGISTRY, load_plugin)
from anomaly_framework.trainers.trainer_base import BaseTrainer

BUILT_IN_PACKAGES = (dataloaders, metrics, modelers, models, trainers)


def dataloader_class(name: str) -> type[BaseDataloader]:
    """The registered dataloader class of dataset ``name``."""
    return DATALOADER_REGISTRY.get(name)


def build_dataloader(config: dict) -> BaseDataloader:
    """The dataloader of ``config['data']['name']``."""
    return dataloader_class(config["data"]["name"])(config["data"], config["seed"])


def build_model(config: dict) -> nn.Module:
    """The pure model of ``config['model']['name']``, built from the model section's other keys.

    Models whose layers depend on the input size (``image_size`` argument) get ``data.image_size``.
    """
    model_class = MODEL_REGISTRY.get(config["model"]["name"])
    kwargs = {key: value for key, value in config["model"].items() if key not in ("name", "backbone_runtime")}
    runtime = check_runtime(config["model"].get("backbone_runtime", "torch"))
    if "image_size" in inspect.signature(model_class).parameters:
        kwargs["image_size"] = config["data"].get("tile_size") or config["data"]["image_size"]  # the model's input
    model = model_class(**kwargs)
    use_backbone_runtime(model, runtime, cache_root(config["data"].get("cache_dir")) / "backbones")
    return model


def build_modeler(config: dict, model: nn.Module) -> BaseModeler:
    """The modeler wrapping ``model``."""
    return MODELER_REGISTRY.get(config["model"]["name"])(model, config=config)


def build_metrics(config: dict) -> Any:
    """The family metrics of the configured trainer, or None where the family has none."""
    family = config["train"]["trainer"]
    return METRICS_REGISTRY.get(family)(config) if family in METRICS_REGISTRY else None


def build_trainer(config: dict, modeler: BaseModeler, dataloader: BaseDataloader, run_dir: Path,
                  device: torch.device) -> BaseTrainer:
    """The trainer of the model's family (``config['train']['trainer']``)."""
    trainer_class = TRAINER_REGISTRY.get(config["train"]["trainer"])
    return trainer_class(modeler, dataloader, config, run_dir, device, metrics=build_metrics(config))


def load_plugins(specs: Any) -> list[str]:
    """``load_plugin`` for each entry of the ``plugins`` config key (a list of strings), after the built-in
    registrations (this module's imports), which a plugin may extend."""
    if not isinstance(specs, (list, tuple)) or not all(isinstance(spec, str) for spec in specs):
        raise FrameworkError(f"Config key 'plugins' must be a list of module names or .py paths, got {specs!r}")
    return [load_plugin(spec) for spec in specs]
