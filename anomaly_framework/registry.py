"""Name → class registries, and the import of a researcher's plugin module that registers into them.

Registration is explicit: each package's ``__init__.py`` imports its modules, whose classes carry
``@<KIND>_REGISTRY.register("name")``. This module imports no part of the framework but ``errors``, so
every package can register here without an import circle; ``factories`` imports the built-in packages
(running their registrations) and builds objects from a config.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from anomaly_framework.errors import FrameworkError

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
