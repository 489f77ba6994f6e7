"""A sweep's plan: every run it holds, each with the folder it writes, in ``<sweep_dir>/plan.json``.

The plan is written before the first run starts, so the sweep folder alone says which runs belong to the
sweep and where each writes; the summary is rebuilt from it and the run folders' status files at any time
(``--summarize SWEEP_DIR``), also while jobs run or after the driver died. ``outcomes.json`` holds what only
the driver knows: attempts, and the errors of runs that failed before their folder existed.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError, one_line
from anomaly_framework.trainers.trainer_gradient import LAST_NAME
from anomaly_framework.utils import read_status

PLAN_NAME = "plan.json"
OUTCOMES_NAME = "outcomes.json"
# Keys that do not change what a run computes: a run continued with --resume in its own folder, or written
# by a cluster launcher (which makes --output-dir absolute), is still the same run for --skip-done.
NOT_COMPARED = ("output_dir",)


def comparable(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for key in NOT_COMPARED:
        config.pop(key, None)
    config.get("train", {}).pop("resume", None)
    return config


# An earlier run in one of these states, with a last.pt, is continued in its folder by --skip-done (a run
# still "running" may belong to a live job, and is left alone).
UNFINISHED = ("interrupted", "failed", "cancelled")


def earlier_runs(config: dict, states: tuple[str, ...]) -> list[Path]:
    """Folders of earlier runs with this resolved config in one of ``states``, newest first."""
    data = config["data"]
    parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / config["model"]["name"]
    wanted = comparable(config)
    return [config_file.parent for config_file in sorted(parent.glob("*/config.json"), reverse=True)
            if read_status(config_file.parent)["status"] in states
            and comparable(json.loads(config_file.read_text())) == wanted]


def find_done(config: dict) -> dict | None:
    """results.json of an earlier run with this resolved config whose status is done, if any."""
    for run_dir in earlier_runs(config, ("done",)):
        if (run_dir / "results.json").is_file():
            return json.loads((run_dir / "results.json").read_text())
    return None


def find_unfinished(config: dict) -> Path | None:
    """The newest earlier run with this config that stopped with a training state to continue from."""
    return next((run_dir for run_dir in earlier_runs(config, UNFINISHED) if (run_dir / LAST_NAME).is_file()), None)


def plan_runs(overrides: dict, models: list[str], categories: list[str], seeds: list[int], sweep_dir: Path,
              skip_done: bool, absolute_paths: bool) -> list[dict]:
    """One entry per model × category × seed: its overrides, the folder it writes (named after the sweep)
    and, with ``skip_done``, the earlier run it reuses. A config error of one combination is its entry's
    ``error``. ``absolute_paths``: jobs on other machines (or another working directory) find the folders."""
    if absolute_paths:
        overrides = {**overrides, **{key: str(Path(overrides[key]).expanduser().absolute())
                                     for key in ("output_dir", "data.root") if overrides.get(key)}}
    plan = []
    for index, (model, category, seed) in enumerate(dict.fromkeys(itertools.product(models, categories, seeds))):
        run_overrides = {**overrides, "model.name": model, "data.category": category, "seed": seed}
        entry = {"index": index, "model": model, "category": category, "seed": seed, "overrides": run_overrides,
                 "run_dir": "", "reused": False, "error": ""}
        try:
            config = resolve_config(run_overrides)
        except FrameworkError as error:
            entry["error"] = one_line(error)
            plan.append(entry)
            continue
        done = find_done(config) if skip_done else None
        unfinished = find_unfinished(config) if skip_done and not done else None
        if done:
            entry.update(run_dir=done["run_dir"], reused=True)
        elif unfinished:  # the job continues it from its last.pt (job.execute_run)
            entry["run_dir"] = str(unfinished)
        else:
            data = config["data"]
            parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / model
            entry["run_dir"] = str(parent / f"{sweep_dir.name}-seed{seed}")
        plan.append(entry)
    return plan


def write_json(path: Path, value) -> None:
    """Atomically: a reader (``--summarize`` while the sweep runs) never sees half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    temporary.replace(path)


def read_plan(sweep_dir: str | Path) -> tuple[list[dict], dict]:
    """(the plan, the driver's outcomes by run index) of a sweep folder; a folder without a plan is one line."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / PLAN_NAME).is_file():
        raise FrameworkError(f"'{sweep_dir}' is not a sweep folder: it has no {PLAN_NAME} "
                             f"(sweep folders lie under <output_dir>/sweeps/<dataset>/)")
    outcomes_file = sweep_dir / OUTCOMES_NAME
    outcomes = json.loads(outcomes_file.read_text()) if outcomes_file.is_file() else {}
    return json.loads((sweep_dir / PLAN_NAME).read_text()), {int(key): value for key, value in outcomes.items()}
