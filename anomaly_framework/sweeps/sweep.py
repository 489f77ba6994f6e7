"""Sweeps: every model × category × seed in its own run folder, and one summary per sweep.

    python main.py --model padim,patchcore --dataset demo --category all --seeds 0,1,2
    python main.py ... --launcher submitit --set sweep.slurm.partition=gpu     # one SLURM job per run
    python main.py ... --launcher ray --set sweep.ray.address=auto             # one Ray task per run
    python main.py --summarize experiments/sweeps/demo/20250101-120000         # while (or after) it runs

The sweep folder ``<output_dir>/sweeps/<dataset>/<timestamp>/`` gets its plan first (plan.json: every run
and the folder it writes), then the summary (runs.csv, summary.csv, summary.md, summary.png, see
``summary.py``), rewritten from the run folders each time a run ends. A failing run is recorded with its
error and the sweep goes on; ``sweep.retries`` starts a failed or killed run again in its folder (from
its last.pt); Ctrl-C cancels the submitted jobs and keeps the summary; ``skip_done`` reuses any earlier
run whose resolved config is identical.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.execution.distributed import broadcast_object, is_main
from anomaly_framework.factories import dataloader_class
from anomaly_framework.reporting.predictions import new_output_dir
from anomaly_framework.sweeps.launchers import make_launcher, require
from anomaly_framework.sweeps.plan import OUTCOMES_NAME, PLAN_NAME, plan_runs, read_plan, write_json
from anomaly_framework.sweeps.settings import resolve_sweep_settings, split_sweep_keys
from anomaly_framework.sweeps.summary import summarise, write_summary
from anomaly_framework.utils import read_status, write_status


def split_list(text: str | None) -> list[str]:
    """``"a,b, c"`` → ``["a", "b", "c"]``; None or empty → []."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def expand_categories(config: dict, categories: list[str]) -> list[str]:
    """``all`` becomes the dataset's categories under its root; other names pass through."""
    if categories != ["all"]:
        return categories
    return dataloader_class(config["data"]["name"]).all_categories(config["data"])


def run_sweep(overrides: dict, models: list[str], categories: list[str], seeds: list[int],
              skip_done: bool = False) -> dict:
    """Runs every combination with the launcher of ``sweep.launcher`` and writes the sweep summary;
    returns its rows, summary and folder.

    Under ``torchrun`` (local launcher) every rank takes part in every run; the process group is joined
    once for the whole sweep (each run keeps it), rank 0 alone writes the plan and summary, and every
    rank returns rank 0's record.
    """
    import torch

    from anomaly_framework.execution.distributed import barrier, init_from_env
    from anomaly_framework.utils import resolve_device

    overrides, sweep_keys = split_sweep_keys(overrides)
    settings = resolve_sweep_settings(sweep_keys)
    if settings["launcher"] != "local":
        require(settings["launcher"], settings["launcher"])  # before any folder is written
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FrameworkError(f"--launcher {settings['launcher']} starts a process per run: start the sweep with "
                                 "python, not torchrun (torchrun is the local launcher's)")
    base, *_ = [resolve_config({**overrides, "model.name": model}) for model in models]  # every config error first
    categories = expand_categories(base, categories)
    _, started_group = init_from_env(resolve_device(base["device"]))
    try:
        result = _sweep(base, overrides, settings, (models, categories, seeds), skip_done)
        barrier()  # every rank past its last collective before the group goes (else rank 0 aborted at exit, 2 in 14)
        return result
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _sweep(base: dict, overrides: dict, settings: dict, grid: tuple, skip_done: bool) -> dict:
    sweep_dir, plan = None, None
    if is_main():
        sweep_dir = new_output_dir(Path(base["output_dir"]) / "sweeps" / base["data"]["name"])
        plan = plan_runs(overrides, *grid, sweep_dir, skip_done, absolute_paths=settings["launcher"] != "local")
        write_json(sweep_dir / PLAN_NAME, plan)
        write_json(sweep_dir / OUTCOMES_NAME, {})
        print(f"sweep folder: {sweep_dir} ({len(plan)} runs, launcher {settings['launcher']})")
    sweep_dir, plan = broadcast_object((str(sweep_dir), plan) if is_main() else None)
    sweep_dir = Path(sweep_dir)
    Driver(sweep_dir, plan, settings).run()
    if not is_main():
        return broadcast_object(None)
    rows = write_summary(sweep_dir)
    print((sweep_dir / "summary.md").read_text())
    failed = sum(row["status"] == "failed" for row in rows)
    if failed:
        print(f"sweep: {failed} of {len(rows)} runs failed; their errors are in {sweep_dir / 'runs.csv'}")
    return broadcast_object({"rows": rows, "summary": summarise(rows), "sweep_dir": str(sweep_dir)})


class Driver:
    """Submits the plan's runs (at most ``slots`` at once), retries failed ones, records outcomes and
    refreshes the summary as runs end; on Ctrl-C cancels what was submitted and marks it."""

    def __init__(self, sweep_dir: Path, plan: list[dict], settings: dict) -> None:
        self.sweep_dir, self.plan, self.retries = sweep_dir, plan, settings["retries"]
        self.launcher = make_launcher(settings, sweep_dir)
        self.outcomes: dict[int, dict] = {}
        self.queue = deque((entry, 1) for entry in plan if entry["run_dir"] and not entry["reused"] and not entry["error"])
        self.running: dict = {}  # launcher handle -> (entry, attempt)

    def run(self) -> None:
        total = len(self.queue)
        try:
            while self.queue or self.running:
                slots = self.launcher.slots or len(self.queue) + len(self.running)
                while self.queue and len(self.running) < slots:
                    entry, attempt = self.queue.popleft()
                    print(f"\n##### sweep {entry['index'] + 1}/{len(self.plan)}: {entry['model']} / {entry['category']}"
                          f" / seed {entry['seed']}" + (f" (attempt {attempt})" if attempt > 1 else ""))
                    self.record(entry, attempts=attempt, state="submitted")
                    self.running[self.launcher.submit(entry)] = (entry, attempt)
                for handle, outcome in self.launcher.finished(list(self.running)):
                    self.ended(*self.running.pop(handle), outcome)
            self.launcher.close()
        except KeyboardInterrupt:  # Ctrl-C: cancel the jobs; the runs that finished keep their summary
            self.cancel()
            self.launcher.close()
            if is_main():
                finished = sum(outcome.get("state") == "ok" for outcome in self.outcomes.values())
                write_summary(self.sweep_dir)
                print(f"sweep interrupted after {finished} of {total} runs; {self.sweep_dir / 'runs.csv'} lists "
                      f"them and marks the rest")
            raise

    def ended(self, entry: dict, attempt: int, outcome: dict) -> None:
        error = outcome["error"]
        if outcome["status"] == "failed" and outcome["retry"] and attempt <= self.retries:
            print(f"sweep: {entry['model']} / {entry['category']} / seed {entry['seed']} failed ({error}); "
                  f"retry {attempt} of {self.retries}")
            self.queue.appendleft((entry, attempt + 1))
        elif outcome["status"] == "failed":
            print(f"sweep: {entry['model']} / {entry['category']} / seed {entry['seed']} failed: {error}")
            run_dir = Path(entry["run_dir"])
            # A killed job left its folder "running": the driver alone can say how it ended.
            if is_main() and run_dir.is_dir() and read_status(run_dir)["status"] not in ("failed", "done"):
                write_status(run_dir, "failed", error=error)
        self.record(entry, attempts=attempt, state=outcome["status"], error=error if outcome["status"] == "failed" else "")
        if is_main():
            write_summary(self.sweep_dir)

    def record(self, entry: dict, **outcome) -> None:
        self.outcomes[entry["index"]] = outcome
        if is_main():
            write_json(self.sweep_dir / OUTCOMES_NAME, self.outcomes)

    def cancel(self) -> None:
        self.launcher.cancel(list(self.running))
        for entry, attempts in [*self.running.values(), *((entry, attempt - 1) for entry, attempt in self.queue)]:
            self.record(entry, attempts=attempts, state="cancelled")
            run_dir = Path(entry["run_dir"])
            if is_main() and run_dir.is_dir() and read_status(run_dir)["status"] in ("running", "failed"):
                write_status(run_dir, "cancelled", message="the sweep was interrupted (Ctrl-C)")


def summarize_sweep(sweep_dir: str | Path) -> tuple[str, str | None]:
    """``--summarize SWEEP_DIR``: the summary rebuilt from the run folders as they stand; prints the table
    and a count of the runs' states."""
    rows = write_summary(sweep_dir)
    print(Path(sweep_dir, "summary.md").read_text())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"{len(rows)} runs: " + ", ".join(f"{count} {status}" for status, count in counts.items()))
    return str(sweep_dir), None
