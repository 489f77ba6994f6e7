"""The callable a SLURM job runs (imported only where submitit is installed).

``submitit.helpers.Checkpointable``: when SLURM preempts the job or its time limit nears, submitit calls
``checkpoint`` and requeues the same call; the run then continues from the ``last.pt`` in its folder.
"""
from __future__ import annotations

import submitit

from anomaly_framework.sweeps.job import execute_run


class RunJob(submitit.helpers.Checkpointable):
    """``RunJob()(entry)`` runs one plan entry; requeued as is after a preemption or time-out."""

    def __call__(self, entry: dict) -> dict:
        return execute_run(entry)
