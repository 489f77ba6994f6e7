"""Sweeps on real engines: submitit's LocalExecutor (real job processes) and a local Ray cluster give the
local launcher's scores; a job killed mid-training is retried and resumes from its last.pt in its own
folder; the summary of a half-finished sweep lists the finished runs and marks the rest."""
import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.sweeps.sweep import run_sweep
from anomaly_framework.utils import read_status

ROOT = Path(__file__).resolve().parents[1]
REASON = "{} is an optional extra (pip install 'anomaly-framework[cluster]'; the test extra includes it)"


@pytest.fixture(autouse=True)
def jobs_import_this_checkout(monkeypatch):
    """Job processes and Ray workers inherit the environment: they import this checkout, one thread each."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _overrides(tmp_path, demo_root, name: str, **extra) -> dict:
    return {"data.name": "demo", "data.root": str(demo_root), "model.backbone": "resnet18", "model.pretrained": False,
            "data.image_size": 64, "eval.num_figures": 0, "output_dir": str(tmp_path / name), **extra}


def _scores(run_dir) -> str:
    return (Path(run_dir) / "scores.csv").read_text()


def _rows(sweep_dir) -> list[dict]:
    with open(Path(sweep_dir) / "runs.csv") as handle:
        return list(csv.DictReader(handle))


LOCAL_JOBS = {"sweep.launcher": "submitit", "sweep.slurm.cluster": "local", "sweep.slurm.gpus_per_node": 0,
              "sweep.slurm.cpus_per_task": 1, "sweep.slurm.mem_gb": 2, "sweep.poll_s": 0.2}


def test_submitit_jobs_and_ray_tasks_give_the_local_launchers_scores(tmp_path, demo_root):
    pytest.importorskip("submitit", reason=REASON.format("submitit"))
    ray = pytest.importorskip("ray", reason=REASON.format("ray"))
    local = run_sweep(_overrides(tmp_path, demo_root, "local"), ["padim"], ["fabric"], [0, 1])
    expected = {row["seed"]: _scores(row["run_dir"]) for row in local["rows"]}
    assert expected[0] != expected[1]  # the seed draws PaDiM's channels: the comparison can tell runs apart

    jobs = run_sweep(_overrides(tmp_path, demo_root, "jobs", **LOCAL_JOBS, **{"sweep.max_parallel": 2}),
                     ["padim"], ["fabric"], [0, 1])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        tasks = run_sweep(_overrides(tmp_path, demo_root, "tasks", **{"sweep.launcher": "ray"}),
                          ["padim"], ["fabric"], [0, 1])
    finally:
        ray.shutdown()
    for sweep, logs in ((jobs, "jobs"), (tasks, None)):
        assert [(row["seed"], row["status"], row["attempts"]) for row in sweep["rows"]] == [(0, "ok", 1), (1, "ok", 1)]
        assert {row["seed"]: _scores(row["run_dir"]) for row in sweep["rows"]} == expected
        # Each run in its own folder of that sweep's output_dir, its status written by the job itself.
        assert all(read_status(row["run_dir"])["pid"] != os.getpid() for row in sweep["rows"])
        assert not logs or any((Path(sweep["sweep_dir"]) / logs).rglob("*_log.out"))


def _in_thread(target, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = target(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised by the test
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for(path: Path, thread: threading.Thread, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert thread.is_alive() and time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)


def test_a_killed_job_is_retried_and_resumes_from_last_pt_while_the_summary_marks_it(tmp_path, demo_root, capsys):
    pytest.importorskip("submitit", reason=REASON.format("submitit"))
    stfpm = {"stfpm:train.epochs": 3, "data.batch_size": 16}
    uninterrupted = run_experiment(_overrides(tmp_path, demo_root, "alone", **{"model.name": "stfpm", "train.epochs": 3,
                                                                                "data.batch_size": 16}))
    overrides = _overrides(tmp_path, demo_root, "jobs", **LOCAL_JOBS, **stfpm,
                           **{"sweep.max_parallel": 1, "sweep.retries": 1})
    thread, result = _in_thread(run_sweep, overrides, ["padim", "stfpm"], ["fabric"], [0])
    sweeps = tmp_path / "jobs" / "sweeps" / "demo"
    while not any(sweeps.glob("*/plan.json")):
        assert thread.is_alive(), result
        time.sleep(0.02)
    plan = json.loads(next(sweeps.glob("*/plan.json")).read_text())
    run_dir = Path(next(entry["run_dir"] for entry in plan if entry["model"] == "stfpm"))
    _wait_for(run_dir / "last.pt", thread)  # one epoch done: the job trains

    sweep_dir = next(sweeps.iterdir())
    assert main(["--summarize", str(sweep_dir)]) == 0  # half-finished: padim done, stfpm running
    half = {row["model"]: row for row in _rows(sweep_dir)}
    padim_results = json.loads((Path(half["padim"]["run_dir"]) / "results.json").read_text())
    assert (half["padim"]["status"], float(half["padim"]["image_auroc"])) == ("ok", padim_results["metrics"]["image_auroc"])
    assert (half["stfpm"]["status"], half["stfpm"]["image_auroc"], half["stfpm"]["run_dir"]) == ("running", "", str(run_dir))
    assert "2 runs: 1 ok, 1 running" in capsys.readouterr().out

    os.kill(read_status(run_dir)["pid"], signal.SIGKILL)  # as a node lost or a job preempted without notice
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    rows = {row["model"]: row for row in result["value"]["rows"]}
    assert (rows["stfpm"]["status"], rows["stfpm"]["attempts"], rows["stfpm"]["run_dir"]) == ("ok", 2, str(run_dir))
    history = json.loads((run_dir / "results.json").read_text())["fit"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert "continuing from" in "".join(p.read_text() for p in (sweep_dir / "jobs").rglob("*_log.out"))
    assert _scores(run_dir) == _scores(uninterrupted["run_dir"])  # resumed training ends where an uninterrupted one does


def test_summarize_and_a_missing_engine_are_one_line(tmp_path, demo_root, capsys, monkeypatch):
    assert main(["--summarize", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: '{tmp_path}' is not a sweep folder: it has no plan.json "
                                               "(sweep folders lie under <output_dir>/sweeps/<dataset>/)")
    from anomaly_framework.sweeps import launchers

    monkeypatch.setattr(launchers.importlib.util, "find_spec", lambda name: None)
    argv = ["--model", "padim", "--dataset", "demo", "--data-root", str(demo_root), "--output-dir", str(tmp_path / "o"),
            "--launcher", "ray"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --launcher ray needs the ray package: pip install 'anomaly-framework[cluster]'")
    assert main(argv[:-2] + ["--set", "sweep.retries=-1"]) == 2
    assert "'sweep.retries' must be at least 0" in capsys.readouterr().err
    assert main(argv[:-2] + ["--set", "sweep.slurm.partiton=gpu"]) == 2
    assert "Unknown config key 'sweep.slurm.partiton'" in capsys.readouterr().err


def test_runs_filling_one_image_and_feature_cache_at_once_get_the_uncached_scores(tmp_path, demo_root):
    """Three real processes (as three cluster jobs on a shared filesystem) fill one empty cache together."""
    import subprocess
    import sys

    def argv(name: str, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "main.py"), "--model", "padim", "--dataset", "demo", "--category", "fabric",
                "--data-root", str(demo_root), "--backbone", "resnet18", "--image-size", "64", "--output-dir",
                str(tmp_path / name), "--set", "model.pretrained=false", "--set", "eval.num_figures=0", *extra]

    uncached = run_experiment(_overrides(tmp_path, demo_root, "uncached", **{
        "data.cache": False, "train.feature_cache_mb": 0, "train.feature_disk_cache_mb": 0}))
    shared = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    processes = [subprocess.Popen(argv(f"p{i}", *shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(3)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    for out, _ in outputs:
        assert _scores(out.strip().splitlines()[-1]) == _scores(uncached["run_dir"])
    # The same entries, byte for byte, as one run filling a cache alone; no temporary or partial file.
    run_experiment(_overrides(tmp_path, demo_root, "lone", **{"data.cache_dir": str(tmp_path / "lone_cache")}))

    def entries(folder: Path) -> dict[str, bytes]:
        return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    together, alone = entries(tmp_path / "cache"), entries(tmp_path / "lone_cache")
    assert together == alone and len(alone) > 100 and all(name.endswith(".npy") for name in alone)
