"""Name → class registries and the ``build_*`` factories that turn a resolved config into objects.

Registration is explicit: each package's ``__init__.py`` imports its modules, whose classes carry
``@<KIND>_REGISTRY.register("name")``. ``import_all()`` imports those packages once.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from anomaly_framework.utils import FrameworkError

T = TypeVar("T")


def _same_definition(old: Any, new: Any) -> bool:
    return all(getattr(old, key, None) == getattr(new, key, object()) for key in ("__module__", "__qualname__"))


class Registry:
    """A named mapping of builders; duplicate names are refused, unknown names list the known ones.

    Args:
        kind: what the registry holds, used in error messages ("model", "dataset", ...).
        contract: one line saying what a registered object must provide.
    """

    def __init__(self, kind: str, contract: str) -> None:
        self.kind = kind
        self.contract = contract
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a class or function under ``name``."""

        def add(obj: T) -> T:
            # Re-running a notebook cell re-registers the same definition: it replaces itself.
            if name in self._entries and not _same_definition(self._entries[name], obj):
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> Any:
        """The object registered under ``name``."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise FrameworkError(f"Unknown {self.kind} '{name}': known {self.kind}s are {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


DATALOADER_REGISTRY = Registry("dataset", "BaseDataloader subclass built from (data config, seed)")
MODEL_REGISTRY = Registry("model", "nn.Module built from the config's model section as keyword arguments")
MODELER_REGISTRY = Registry("modeler", "BaseModeler subclass wrapping the model of the same name")
TRAINER_REGISTRY = Registry("trainer", "BaseTrainer subclass for one model family")
METRICS_REGISTRY = Registry("metrics", "family metrics with compute_train_metrics / compute_valid_metrics")

_imported = False


def import_all() -> None:
    """Imports every package once so that their registrations run."""
    global _imported
    if not _imported:
        from anomaly_framework import dataloaders  # noqa: F401
        from anomaly_framework import metrics  # noqa: F401
        from anomaly_framework import modelers  # noqa: F401
        from anomaly_framework import models  # noqa: F401
        from anomaly_framework import trainers  # noqa: F401

        _imported = True


def build_dataloader(config: dict):
    """The dataloader of ``config['data']['name']``."""
    import_all()
    return DATALOADER_REGISTRY.get(config["data"]["name"])(config["data"], config["seed"])


def build_model(config: dict):
    """The pure model of ``config['model']['name']``, built from the model section's other keys.

    Models whose layers depend on the input size (``image_size`` argument) get ``data.image_size``.
    """
    import_all()
    model_class = MODEL_REGISTRY.get(config["model"]["name"])
    kwargs = {key: value for key, value in config["model"].items() if key != "name"}
    if "image_size" in inspect.signature(model_class).parameters:
        kwargs["image_size"] = config["data"]["image_size"]
    return model_class(**kwargs)


def build_modeler(config: dict, model):
    """The modeler wrapping ``model``."""
    import_all()
    return MODELER_REGISTRY.get(config["model"]["name"])(model, config=config)


def build_metrics(config: dict):
    """The family metrics of the configured trainer, or None where the family has none."""
    import_all()
    family = config["train"]["trainer"]
    return METRICS_REGISTRY.get(family)(config) if family in METRICS_REGISTRY else None


def build_trainer(config: dict, modeler, dataloader, run_dir: Path, device):
    """The trainer of the model's family (``config['train']['trainer']``)."""
    import_all()
    trainer_class = TRAINER_REGISTRY.get(config["train"]["trainer"])
    return trainer_class(modeler, dataloader, config, run_dir, device, metrics=build_metrics(config))


def load_plugin(spec: str) -> str:
    """Imports a researcher's module so that its registrations run; returns how to import it again.

    ``spec`` is an importable module name (``my_models``) or a ``.py`` file (returned absolute, so that
    a saved config re-imports it from anywhere). A file is imported under its stem, once.
    """
    path = Path(spec).expanduser()
    is_file = spec.endswith(".py") or path.is_file()
    try:
        if not is_file:
            importlib.import_module(spec)
            return spec
        path = path.resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file '{path}'")
        loaded = sys.modules.get(path.stem)
        if loaded is not None:
            if Path(getattr(loaded, "__file__", "") or "").resolve() != path:
                raise ImportError(f"a module named '{path.stem}' is already imported from elsewhere: rename the file")
            return str(path)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module: ModuleType = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[path.stem]
            raise
        return str(path)
    except Exception as error:  # the plugin's own code may raise anything: one line naming it
        reason = str(error) if isinstance(error, FrameworkError) else f"{type(error).__name__}: {error}"
        raise FrameworkError(f"Cannot import plugin '{spec}' (give an importable module name or a .py path): "
                             f"{reason}") from error


def load_plugins(specs: Any) -> list[str]:
    """``load_plugin`` for each entry of the ``plugins`` config key (a list of strings)."""
    if not isinstance(specs, (list, tuple)) or not all(isinstance(spec, str) for spec in specs):
        raise FrameworkError(f"Config key 'plugins' must be a list of module names or .py paths, got {specs!r}")
    import_all()  # the package's own registrations first: a plugin may extend them
    return [load_plugin(spec) for spec in specs]
