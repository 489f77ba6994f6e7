"""Where a sweep's runs execute: here, one after another (local); as SLURM jobs (submitit); as tasks on a
Ray cluster (ray). Each launcher submits plan entries, reports the ones that ended with their outcome and
cancels the rest on Ctrl-C; the driver (``sweep.py``) does retries and the summary for all three alike.

submitit and ray are optional: ``pip install 'anomaly-framework[cluster]'``.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from anomaly_framework.errors import FrameworkError, one_line
from anomaly_framework.execution.distributed import broadcast_object, is_main
from anomaly_framework.sweeps.job import execute_run


def died(error: BaseException) -> dict:
    """The outcome of a job that ended without returning one (killed, preempted past its requeues, lost)."""
    return {"status": "failed", "error": f"the job ended without a result: {one_line(error)}", "retry": True,
            "run_dir": ""}


def require(package: str, launcher: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise FrameworkError(f"--launcher {launcher} needs the {package} package: pip install 'anomaly-framework[cluster]'")


class LocalLauncher:
    """In this process, one run at a time; under ``torchrun`` every rank takes part in every run and rank 0's
    outcome decides for all (a retry then happens on every rank)."""

    slots = 1

    def __init__(self) -> None:
        self.outcomes: dict[int, dict] = {}

    def submit(self, entry: dict) -> int:
        handle = len(self.outcomes)
        outcome = execute_run(entry)
        self.outcomes[handle] = broadcast_object(outcome if is_main() else None)
        return handle

    def finished(self, handles: list) -> list[tuple[object, dict]]:
        return [(handle, self.outcomes[handle]) for handle in handles]

    def cancel(self, handles: list) -> None:
        """Nothing runs beside the driver."""

    def close(self) -> None:
        """Nothing to end."""


class SubmititLauncher:
    """One SLURM job per run (or, with ``sweep.slurm.cluster=local``, submitit's LocalExecutor: real job
    processes on this machine). Job logs lie in ``<sweep_dir>/jobs``."""

    def __init__(self, settings: dict, sweep_dir: Path) -> None:
        require("submitit", "submitit")
        import submitit

        from anomaly_framework.sweeps.submitit_job import RunJob

        slurm = settings["slurm"]
        self.poll_s, self.job = settings["poll_s"], RunJob()
        self.slots = settings["max_parallel"]
        requeues = {f"{slurm['cluster']}_max_num_timeout": slurm["max_requeues"]}
        self.executor = submitit.AutoExecutor(folder=sweep_dir / "jobs", cluster=slurm["cluster"], **requeues)
        parameters = {"timeout_min": slurm["timeout_min"], "mem_gb": slurm["mem_gb"], "cpus_per_task": slurm["cpus_per_task"],
                      "gpus_per_node": slurm["gpus_per_node"], "name": f"anomaly-sweep-{sweep_dir.name}"}
        parameters.update({f"slurm_{key}": slurm[key] for key in ("partition", "account") if slurm[key]})
        self.executor.update_parameters(**parameters)

    def submit(self, entry: dict):
        return self.executor.submit(self.job, entry)

    def finished(self, handles: list) -> list[tuple[object, dict]]:
        while True:
            ended = [handle for handle in handles if handle.done()]
            if ended:
                return [(handle, self.outcome(handle)) for handle in ended]
            time.sleep(self.poll_s)

    @staticmethod
    def outcome(job) -> dict:
        try:
            return job.result()
        except Exception as error:  # noqa: BLE001 - submitit's errors for a failed, killed or cancelled job
            return died(error)

    def cancel(self, handles: list) -> None:
        for job in handles:
            job.cancel(check=False)

    def close(self) -> None:
        """Jobs end by themselves."""


class RayLauncher:
    """One Ray task per run on the cluster at ``sweep.ray.address`` (None: a cluster of this machine, unless
    ``ray.init`` was called already), each asking for ``sweep.ray.num_cpus`` / ``num_gpus``."""

    def __init__(self, settings: dict) -> None:
        require("ray", "ray")
        import ray

        self.started = not ray.is_initialized()  # else the caller's own ray.init: theirs to end
        if self.started:
            ray.init(address=settings["ray"]["address"])
        self.ray, self.slots = ray, settings["max_parallel"]
        # max_retries=0: the driver retries (sweep.retries), for every launcher alike.
        self.task = ray.remote(execute_run).options(num_cpus=settings["ray"]["num_cpus"],
                                                    num_gpus=settings["ray"]["num_gpus"], max_retries=0)

    def submit(self, entry: dict):
        return self.task.remote(entry)

    def finished(self, handles: list) -> list[tuple[object, dict]]:
        ended, _ = self.ray.wait(handles, num_returns=1)
        return [(handle, self.outcome(handle)) for handle in ended]

    def outcome(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except Exception as error:  # noqa: BLE001 - a crashed or cancelled worker
            return died(error)

    def cancel(self, handles: list) -> None:
        for handle in handles:
            self.ray.cancel(handle, force=True)

    def close(self) -> None:
        """Disconnects (and stops the cluster ray.init started here), so the workers' last log lines come
        before the sweep's summary."""
        if self.started:
            self.ray.shutdown()


def make_launcher(settings: dict, sweep_dir: Path):
    if settings["launcher"] == "submitit":
        return SubmititLauncher(settings, sweep_dir)
    if settings["launcher"] == "ray":
        return RayLauncher(settings)
    return LocalLauncher()
