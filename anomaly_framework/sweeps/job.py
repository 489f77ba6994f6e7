"""One planned run, as every launcher executes it: in this process, in a SLURM job or in a Ray task.

A run started again (a retry, a requeued or preempted job) writes the same folder and continues from the
``last.pt`` it left there, so an interrupted gradient-trained run loses at most one epoch.
"""
from __future__ import annotations

import traceback
from pathlib import Path

from anomaly_framework.errors import FrameworkError, one_line
from anomaly_framework.main import run_experiment
from anomaly_framework.trainers.trainer_gradient import LAST_NAME
from anomaly_framework.utils import read_status


def execute_run(entry: dict) -> dict:
    """Runs a plan entry; returns its outcome (status ok or failed, error, whether a retry may help) rather
    than raising, so that the error crosses any launcher as one line. Ctrl-C still propagates."""
    overrides = dict(entry["overrides"])
    run_dir = Path(entry["run_dir"])
    if (run_dir / LAST_NAME).is_file() and read_status(run_dir)["status"] != "done":
        overrides["train.resume"] = str(run_dir)
        print(f"continuing from {run_dir / LAST_NAME}")
    try:
        results = run_experiment(overrides, run_dir=run_dir)
    except Exception as error:  # noqa: BLE001 - every failure becomes the run's recorded error
        if not isinstance(error, FrameworkError):
            traceback.print_exc()
        # A user error fails the same way every time; anything else (a lost node, memory) may not.
        return {"status": "failed", "error": one_line(error), "retry": not isinstance(error, FrameworkError),
                "run_dir": getattr(error, "run_dir", "")}
    return {"status": "ok", "error": "", "retry": False, "run_dir": results["run_dir"]}
