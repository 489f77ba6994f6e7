"""The ``sweep.*`` keys: where a sweep's runs execute, how often a failed run is retried, and what each
cluster job asks for. They steer the sweep, not a run, so they stay out of every run's config.json.

    --launcher submitit --set sweep.slurm.partition=gpu --set sweep.slurm.timeout_min=240
    --launcher ray --set sweep.ray.address=auto --set sweep.ray.num_gpus=1
"""
from __future__ import annotations

import copy

from anomaly_framework.errors import FrameworkError

LAUNCHERS = ("local", "submitit", "ray")
PREFIX = "sweep."

SWEEP_DEFAULTS: dict = {
    "launcher": "local",  # local: one run after another in this process; submitit: SLURM jobs; ray: Ray tasks
    "retries": 0,  # a failed or killed run is started again (in its own folder) this many times
    "max_parallel": None,  # submitit / ray: at most this many runs submitted at once; None = all
    "poll_s": 2.0,  # submitit: seconds between looks at the jobs' states
    "slurm": {
        "cluster": "slurm",  # slurm, or local (submitit's LocalExecutor: real job processes on this machine)
        "partition": None,
        "account": None,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 32.0,
        "timeout_min": 240,  # SLURM's time limit; a job that reaches it is requeued and resumes from last.pt
        "max_requeues": 3,  # preemptions / time-outs one run may survive (submitit's max_num_timeout)
    },
    "ray": {
        "address": None,  # an existing cluster ("auto", "ray://head:10001"); None = ray.init() on this machine
        "num_cpus": 1.0,  # resources one run asks of the cluster
        "num_gpus": 0.0,
    },
}
# Keys whose default is None, with the type a set value must have.
NULLABLE = {"max_parallel": int, "slurm.partition": str, "slurm.account": str, "ray.address": str}


def split_sweep_keys(overrides: dict) -> tuple[dict, dict]:
    """(the run overrides, the ``sweep.*`` overrides with the prefix dropped)."""
    sweep = {key[len(PREFIX):]: value for key, value in overrides.items() if key.startswith(PREFIX)}
    return {key: value for key, value in overrides.items() if not key.startswith(PREFIX)}, sweep


def resolve_sweep_settings(overrides: dict) -> dict:
    """The defaults with ``overrides`` (dotted, prefix dropped) applied; a bad key or value is one line."""
    settings = copy.deepcopy(SWEEP_DEFAULTS)
    for path, value in overrides.items():
        *sections, key = path.split(".")
        target = settings
        for section in sections:
            target = target.get(section) if isinstance(target.get(section), dict) else None
            if target is None:
                break
        if target is None or key not in target or isinstance(target[key], dict):
            raise FrameworkError(f"Unknown config key '{PREFIX}{path}': known are "
                                 f"{', '.join(PREFIX + name for name in flat_keys(SWEEP_DEFAULTS))}")
        target[key] = checked(path, target[key], value)
    if settings["launcher"] not in LAUNCHERS:
        raise FrameworkError(f"Config key 'sweep.launcher' (--launcher) must be one of {', '.join(LAUNCHERS)}, "
                             f"got {settings['launcher']!r}")
    if settings["retries"] < 0 or (settings["max_parallel"] is not None and settings["max_parallel"] < 1):
        raise FrameworkError("Config keys 'sweep.retries' must be at least 0 and 'sweep.max_parallel' at least 1, "
                             f"got {settings['retries']} and {settings['max_parallel']}")
    if settings["slurm"]["cluster"] not in ("slurm", "local"):
        raise FrameworkError(f"Config key 'sweep.slurm.cluster' must be slurm or local, got {settings['slurm']['cluster']!r}")
    return settings


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    return [name for key, value in tree.items()
            for name in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def checked(path: str, default, value):
    """``value`` if it has the default's type (ints widen to float), else a one-line error naming the key."""
    expected = NULLABLE.get(path) if default is None else type(default)
    if value is None and path in NULLABLE:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    raise FrameworkError(f"Config key '{PREFIX}{path}' must be {expected.__name__}, got {type(value).__name__} {value!r}")
