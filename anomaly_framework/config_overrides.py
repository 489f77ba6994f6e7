"""Override dicts as users write them: dotted keys, nested sections and per-model (``MODEL:KEY``) keys.

Kept apart from config.py, which holds the default tables and resolves a run's config from them.
"""
from __future__ import annotations

import copy

from anomaly_framework.errors import FrameworkError

SCOPE_SEPARATOR = ":"  # MODEL:KEY, a key for one model's runs only
def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: ``base`` with ``update`` merged in recursively."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def expand_dotted(overrides: dict) -> dict:
    """Turns ``{"train.lr": 0.1}`` into ``{"train": {"lr": 0.1}}``; nested dicts pass through."""
    nested: dict = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = expand_dotted(value)
        parts = str(key).split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise FrameworkError(f"Config key '{key}' mixes a value and a section")
        if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
            target[parts[-1]] = deep_merge(target[parts[-1]], value)
        else:
            target[parts[-1]] = value
    return nested


def split_scoped(overrides: dict) -> tuple[dict, dict[str, dict]]:
    """The plain overrides, and per model the ones scoped to it: ``{"patchcore:model.coreset_ratio": 0.01}``
    applies to PatchCore runs only, so one sweep can set a key that only some of its models have."""
    plain, scoped = {}, {}
    for key, value in overrides.items():
        scope, separator, rest = str(key).partition(SCOPE_SEPARATOR)
        if not separator:
            plain[key] = value
        elif not scope or not rest:
            raise FrameworkError(f"Config key '{key}': a per-model key reads MODEL{SCOPE_SEPARATOR}KEY, "
                                 f"e.g. 'patchcore{SCOPE_SEPARATOR}model.coreset_ratio'")
        else:
            scoped.setdefault(scope, {})[rest] = value
    return plain, scoped


def check_scopes(scoped: dict[str, dict], models: list[str]) -> None:
    """Refuses a per-model key whose model is not among the ``models`` being run (a typo would be ignored)."""
    for scope, keys in scoped.items():
        if scope not in models:
            example = next(iter(keys))
            raise FrameworkError(f"Config key '{scope}{SCOPE_SEPARATOR}{example}' is scoped to model '{scope}', "
                                 f"which is not run here (models: {', '.join(models)})")
