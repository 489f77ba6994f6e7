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
import torch

from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.sweeps.sweep import run_sweep
from anomaly_framework.utils import read_status

ROOT = Path(__file__).resolve().parents[1]
REASON = "{} is an optional extra (pip install 'anomaly-framework[cluster]'; the test extra includes it)"


@pytest.fixture(autouse=True, scope="module")
def jobs_import_this_checkout():
    """Job processes and Ray workers inherit the environment: they import this checkout, one thread each.
    The runs made in this process (the local launcher, the references, module fixtures included) use one
    thread too, so that every side sums in the same order and scores.csv can be compared byte for byte."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


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


STFPM = {"stfpm:train.epochs": 3, "data.batch_size": 16}


@pytest.fixture(scope="module")
def uninterrupted_stfpm(tmp_path_factory, demo_root) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    return Path(run_experiment(_overrides(tmp_path, demo_root, "alone", **{"model.name": "stfpm", **STFPM}))["run_dir"])


def _training_job(tmp_path, thread, result) -> tuple[Path, Path]:
    """(sweep folder, STFPM's run folder) once that run's job has completed an epoch."""
    sweeps = tmp_path / "jobs" / "sweeps" / "demo"
    while not any(sweeps.glob("*/plan.json")):
        assert thread.is_alive(), result
        time.sleep(0.02)
    plan = json.loads(next(sweeps.glob("*/plan.json")).read_text())
    run_dir = Path(next(entry["run_dir"] for entry in plan if entry["model"] == "stfpm"))
    _wait_for(run_dir / "last.pt", thread)
    return next(sweeps.iterdir()), run_dir


def test_a_preempted_job_is_requeued_by_submitit_and_resumes_from_last_pt(tmp_path, demo_root, uninterrupted_stfpm):
    submitit = pytest.importorskip("submitit", reason=REASON.format("submitit"))
    thread, result = _in_thread(run_sweep, _overrides(tmp_path, demo_root, "jobs", **LOCAL_JOBS, **STFPM),
                                ["stfpm"], ["fabric"], [0])
    sweep_dir, run_dir = _training_job(tmp_path, thread, result)
    first = read_status(run_dir)["pid"]
    # What SLURM sends before a preemption or the time limit; submitit checkpoints and requeues the job.
    os.kill(first, submitit.local.local.LocalJobEnvironment._usr_sig())
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    (row,) = result["value"]["rows"]
    assert (row["status"], row["attempts"], row["run_dir"]) == ("ok", 1, str(run_dir))  # no retry: a requeue
    assert read_status(run_dir)["pid"] != first
    logs = "".join(path.read_text() for path in (sweep_dir / "jobs").rglob("*_log.*"))
    assert "Requeued job" in logs and f"continuing from {run_dir / 'last.pt'}" in logs
    history = json.loads((run_dir / "results.json").read_text())["fit"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert _scores(run_dir) == _scores(uninterrupted_stfpm)


def test_a_killed_job_is_retried_and_resumes_from_last_pt_while_the_summary_marks_it(tmp_path, demo_root, capsys,
                                                                                     uninterrupted_stfpm):
    pytest.importorskip("submitit", reason=REASON.format("submitit"))
    overrides = _overrides(tmp_path, demo_root, "jobs", **LOCAL_JOBS, **STFPM,
                           **{"sweep.max_parallel": 1, "sweep.retries": 1})
    thread, result = _in_thread(run_sweep, overrides, ["padim", "stfpm"], ["fabric"], [0])
    sweep_dir, run_dir = _training_job(tmp_path, thread, result)  # one epoch done: the job trains

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
    assert _scores(run_dir) == _scores(uninterrupted_stfpm)  # resumed training ends where an uninterrupted one does


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


def test_ctrl_c_in_the_driver_cancels_the_submitted_jobs(tmp_path, demo_root):
    pytest.importorskip("submitit", reason=REASON.format("submitit"))
    import subprocess
    import sys

    argv = [sys.executable, str(ROOT / "main.py"), "--model", "stfpm", "--dataset", "demo", "--category", "fabric",
            "--data-root", str(demo_root), "--backbone", "resnet18", "--image-size", "64", "--epochs", "50",
            "--batch-size", "16", "--output-dir", str(tmp_path / "jobs"), "--set", "model.pretrained=false",
            "--set", "eval.num_figures=0", "--launcher", "submitit",
            *[item for key, value in LOCAL_JOBS.items() if key != "sweep.launcher" for item in ("--set", f"{key}={value}")]]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        driver = subprocess.Popen(argv, stdout=out, stderr=err,  # as started from a terminal (see test_run_records)
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            run_dir = None
            deadline = time.monotonic() + 240
            while run_dir is None or not (run_dir / "last.pt").is_file():
                assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
                plans = list((tmp_path / "jobs" / "sweeps" / "demo").glob("*/plan.json"))
                run_dir = Path(json.loads(plans[0].read_text())[0]["run_dir"]) if plans else None
                time.sleep(0.05)
            job = read_status(run_dir)["pid"]
            driver.send_signal(signal.SIGINT)  # the driver alone, as Ctrl-C in the terminal running the sweep
            assert driver.wait(timeout=120) == 130
        finally:
            if driver.poll() is None:
                driver.kill()
    for _ in range(600):  # the job process ends (it was sent SIGINT by the cancel)
        if not Path(f"/proc/{job}").exists() or "zombie" in Path(f"/proc/{job}/status").read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job process {job} still runs after the sweep was cancelled")
    sweep_dir = next((tmp_path / "jobs" / "sweeps" / "demo").iterdir())
    assert [row["status"] for row in _rows(sweep_dir)] in (["cancelled"], ["interrupted"])
    assert read_status(run_dir)["status"] in ("cancelled", "interrupted") and not (run_dir / "results.json").exists()
    assert f"{sweep_dir / 'runs.csv'} lists them and marks the rest" in (tmp_path / "out").read_text()


def test_skip_done_continues_an_interrupted_run_in_its_folder(tmp_path, demo_root, interrupt_training,
                                                             uninterrupted_stfpm):
    overrides = _overrides(tmp_path, demo_root, "local", **STFPM)
    interrupt_training(2)  # Ctrl-C in the second epoch: last.pt holds the first
    with pytest.raises(KeyboardInterrupt):
        run_sweep(overrides, ["stfpm"], ["fabric"], [0])
    (run_dir,) = [path.parent for path in (tmp_path / "local").rglob("last.pt")]
    assert read_status(run_dir)["status"] == "interrupted"
    interrupt_training(None)
    (row,) = run_sweep(overrides, ["stfpm"], ["fabric"], [0], skip_done=True)["rows"]
    assert (row["status"], row["run_dir"]) == ("ok", str(run_dir))
    history = json.loads((run_dir / "results.json").read_text())["fit"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    assert _scores(run_dir) == _scores(uninterrupted_stfpm)
