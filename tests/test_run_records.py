"""What a newcomer meets around the algorithms: one-line errors, Ctrl-C, the run status, failing sweeps,
what a run leaves on disk, DRAEM's activation memory and a --help that does not load torch."""
import copy
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.execution.interrupts import ctrl_c_stops_at_next_batch, raise_if_interrupted
from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_draem import DraemModel
from anomaly_framework.models.model_padim import PACKED_KEY, PadimModel
from anomaly_framework.sweeps.plan import find_done
from anomaly_framework.sweeps.summary import NO_RUN_DIR, markdown_table, plot_summary, summarise
from anomaly_framework.sweeps.sweep import run_sweep
from anomaly_framework.trainers.trainer_memory import MemoryTrainer
from anomaly_framework.utils import read_status

ROOT = Path(__file__).resolve().parents[1]


def _argv(tmp_path, demo_root, model="padim", *extra):
    return ["--model", model, "--dataset", "demo", "--data-root", str(demo_root), "--backbone", "resnet18",
            "--image-size", "64", "--batch-size", "16", "--output-dir", str(tmp_path / "runs"),
            "--set", "model.pretrained=false", "--set", "eval.num_figures=0", *extra]


PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm's redraws (a cold feature cache draws one)


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, lines
    return lines[0]


# -- one line instead of a traceback ---------------------------------------------------------------------
@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_below_one_are_refused_in_one_line(tmp_path, demo_root, capsys, epochs):
    assert main(_argv(tmp_path, demo_root, "stfpm", "--epochs", epochs)) == 2
    assert f"'train.epochs' (--epochs) must be at least 1, got {epochs}" in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_memory_models_say_they_have_nothing_to_resume(tmp_path, demo_root, capsys):
    assert main(_argv(tmp_path, demo_root, "patchcore", "--resume", str(tmp_path))) == 2
    assert "memory models have nothing to resume" in _one_error_line(capsys)


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_dir_that_is_a_file_is_one_line(tmp_path, demo_root, capsys, below):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    output = blocker / below if below else blocker
    argv = _argv(tmp_path, demo_root) + ["--output-dir", str(output)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"output_dir '{output}'" in line and "--output-dir" in line
    assert blocker.read_text() == "mine"


def _truncated(path: Path, keep: float) -> Path:
    torch.save({"model": {"weight": torch.arange(100_000.0)}, "config": {}, "threshold": 1.0}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (a device that is always full)")
def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, demo_root, capsys, monkeypatch):
    """The run's checkpoint write hits a full disk (its temporary file is /dev/full): one line naming the
    file, no traceback, neither a checkpoint nor a temporary file left in the run folder."""
    import anomaly_framework.trainers.trainer_base as trainer_base

    def full_disk(state, path):
        temporary = path.with_name(path.name + ".tmp")
        temporary.symlink_to("/dev/full")
        return save(state, path)

    save = trainer_base.save_atomically
    monkeypatch.setattr(trainer_base, "save_atomically", full_disk)
    assert main(_argv(tmp_path, demo_root)) == 2
    line = _one_error_line(capsys)
    run_dir = next((tmp_path / "runs").rglob("config.json")).parent
    assert f"Cannot write '{run_dir / 'checkpoint.pt'}': No space left on device" in line
    assert not list(run_dir.glob("checkpoint.pt*"))


@pytest.mark.parametrize("keep", [0.5, 0.0])
@pytest.mark.parametrize("command", [["predict", "--input", "."], ["export", "--format", "onnx"]])
def test_truncated_or_empty_checkpoint_for_predict_and_export_is_one_line(tmp_path, capsys, keep, command):
    checkpoint = _truncated(tmp_path / "checkpoint.pt", keep)
    assert main([*command, "--checkpoint", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert str(checkpoint) in line and "not a readable checkpoint" in line


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_or_empty_last_pt_for_resume_is_one_line_and_a_failed_status(tmp_path, demo_root, capsys, keep):
    previous = tmp_path / "previous"
    previous.mkdir()
    last = _truncated(previous / "last.pt", keep)
    assert main(_argv(tmp_path, demo_root, "stfpm", "--resume", str(previous))) == 2
    line = _one_error_line(capsys)
    assert str(last) in line and "not a readable checkpoint" in line
    assert not (tmp_path / "runs").exists()  # the run continues in its own folder
    status = read_status(previous)
    assert status["status"] == "failed" and str(last) in status["error"]


# -- Ctrl-C, status, resume, what stays on disk ---------------------------------------------------------
def test_ctrl_c_says_where_and_how_to_resume_and_the_resumed_run_keeps_one_copy_of_the_weights(
        tmp_path, demo_root, capsys, interrupt_training):
    interrupt_training(2)
    argv = _argv(tmp_path, demo_root, "stfpm", "--epochs", "2", "--set", "data.val_fraction=0.25")
    assert main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    interrupted = next((tmp_path / "runs").rglob("config.json")).parent
    assert line == (f"interrupted: run interrupted in epoch 2/2 after 0 training steps; last.pt holds 1 completed epoch; "
                    f"continue it with the same options plus --resume {interrupted}")
    assert read_status(interrupted) == {**read_status(interrupted), "status": "interrupted", "message": line[13:]}
    assert (interrupted / "last.pt").is_file() and not (interrupted / "results.json").exists()

    interrupt_training(None)
    assert main(argv + ["--resume", str(interrupted)]) == 0
    resumed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert read_status(resumed)["status"] == "done"
    results = json.loads((resumed / "results.json").read_text())
    assert results["fit"]["epochs"] == 2
    # Done: the best weights live in checkpoint.pt alone; the training state is dropped.
    assert sorted(p.name for p in resumed.glob("*.pt")) == ["checkpoint.pt"]
    # The run goes on in its own folder: one folder, no interrupted copy left beside it.
    assert resumed == interrupted and len(list((tmp_path / "runs").rglob("config.json"))) == 1


def test_ctrl_c_in_the_first_epoch_says_the_run_restarts(tmp_path, demo_root, capsys, interrupt_training):
    interrupt_training(1)
    assert main(_argv(tmp_path, demo_root, "stfpm", "--epochs", "2", "--set", "data.val_fraction=0.25")) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("interrupted: run interrupted in epoch 1/2 after 0 training steps; before any epoch completed; "
                    "nothing was saved to resume: run it again to restart")
    assert not any((tmp_path / "runs").rglob("last.pt"))


def test_ctrl_c_of_a_memory_model_says_there_is_nothing_to_resume(tmp_path, demo_root, capsys, monkeypatch):
    def interrupt(self, loader, epoch=1, num_epochs=1, mode="train"):
        raise KeyboardInterrupt

    monkeypatch.setattr(MemoryTrainer, "run_epoch", interrupt)
    assert main(_argv(tmp_path, demo_root)) == 130
    line = _one_error_line(capsys)
    assert line == "interrupted: run interrupted while fitting; nothing to resume for this model: run it again"
    assert read_status(next((tmp_path / "runs").rglob("config.json")).parent)["status"] == "interrupted"


def _wait_for(path_glob, parent: Path, process: subprocess.Popen, seconds: float = 120.0) -> Path:
    """The first file matching ``path_glob`` under ``parent`` once the running ``process`` has written it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = next(parent.rglob(path_glob), None)
        if found is not None:
            return found
        assert process.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no {path_glob} under {parent} after {seconds} s")


def test_a_real_sigint_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, demo_root, capsys):
    # Two DataLoader workers, as on a machine with cores to spare: the terminal's SIGINT reaches them too,
    # and Python's own handling then printed worker and at-fork tracebacks, or lost the Ctrl-C altogether.
    argv = ["--model", "ae", "--dataset", "demo", "--data-root", str(demo_root), "--image-size", "32",
            "--epochs", "10", "--batch-size", "8", "--output-dir", str(tmp_path / "runs"), "--set", "eval.num_figures=0",
            "--set", "model.base_channels=8", "--set", "data.num_workers=2"]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *argv], cwd=ROOT, stdout=out, stderr=err,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                                   # As started from a terminal: a shell's background job (CI's, say) would
                                   # hand it an ignored SIGINT, which the run rightly keeps ignoring.
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            run_dir = _wait_for("last.pt", tmp_path / "runs", process).parent  # one epoch done: training runs
            os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the process and its workers
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 130 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1].split("\r")[-1]  # after the progress bars' carriage returns
    assert re.fullmatch(rf"interrupted: run interrupted in epoch \d+/10 after \d+ training steps; last.pt holds "
                        rf"\d+ completed epochs?; continue it with the same options plus --resume {re.escape(str(run_dir))}",
                        line), line
    assert read_status(run_dir)["status"] == "interrupted" and read_status(run_dir)["message"] == line[13:]
    completed = int(re.search(r"holds (\d+) completed", line).group(1))
    assert 1 <= completed < 10 and not (run_dir / "results.json").exists()

    capsys.readouterr()
    assert main(argv + ["--resume", str(run_dir)]) == 0
    resumed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed == run_dir and read_status(resumed)["status"] == "done"
    history = json.loads((resumed / "results.json").read_text())["fit"]["history"]
    assert [entry["epoch"] for entry in history] == list(range(1, 11))


def test_ctrl_c_is_raised_between_batches_a_second_one_at_once_and_a_late_one_at_the_end(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in `python main.py`
    try:
        _interrupt_in_every_way()
    finally:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.count("Ctrl-C: stopping at the next batch") == 3


def test_a_background_thread_stops_on_ctrl_c_and_leaves_it_to_the_main_thread(monkeypatch, capsys):
    """A split's features computed ahead in a thread stop at their next batch, and the run still stops."""
    import concurrent.futures

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ctrl_c_stops_at_next_batch():
            signal.raise_signal(signal.SIGINT)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                with pytest.raises(KeyboardInterrupt):
                    pool.submit(raise_if_interrupted).result()
            with pytest.raises(KeyboardInterrupt):
                raise_if_interrupted()  # still requested for the main thread
            raise_if_interrupted()  # and consumed by it
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_in_every_way() -> None:
    with pytest.raises(KeyboardInterrupt) as late:
        with ctrl_c_stops_at_next_batch():
            signal.raise_signal(signal.SIGINT)  # recorded, not raised inside whatever was running
            with pytest.raises(KeyboardInterrupt):
                raise_if_interrupted()
            raise_if_interrupted()  # raised once only
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the second press stops at once
            signal.raise_signal(signal.SIGINT)  # after the last batch loop: raised when the run ends
    assert "its results are complete" in str(late.value)


def test_a_first_ctrl_c_stops_patchcore_s_coreset_loop(monkeypatch, capsys):
    # The greedy loop runs for minutes without a batch boundary; it checks for a requested stop every step.
    from anomaly_framework.models.model_patchcore import greedy_select
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    features = torch.randn(50, 8)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="^$"):
            with ctrl_c_stops_at_next_batch():
                signal.raise_signal(signal.SIGINT)
                greedy_select(features, torch.eye(8), torch.tensor([0]), count=10, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "stopping at the next batch" in capsys.readouterr().err


@pytest.fixture(scope="module")
def padim_done(tmp_path_factory, demo_root):
    """Overrides and results of one finished PaDiM run in a folder of its own."""
    output = tmp_path_factory.mktemp("padim_done")
    overrides = {"model.name": "padim", "data.name": "demo", "data.root": str(demo_root), "model.backbone": "resnet18",
                 "model.pretrained": False, "data.image_size": 64, "eval.num_figures": 0,
                 "output_dir": str(output / "runs")}
    return overrides, run_experiment(overrides)


def test_predict_output_dir_that_is_a_file_is_one_line_before_scoring(tmp_path, demo_root, padim_done, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    image = next((demo_root / "fabric" / "test").rglob("*.png"))
    argv = ["predict", "--checkpoint", padim_done[1]["run_dir"], "--input", str(image), "--output-dir", str(blocker)]
    assert main(argv) == 2
    assert _one_error_line(capsys).startswith(f"error: Cannot create the output folder '{blocker}'")
    assert blocker.read_text() == "mine"


def test_skip_done_reuses_only_runs_whose_status_is_done(padim_done, monkeypatch):
    overrides, results = padim_done
    run_dir = Path(results["run_dir"])
    assert read_status(run_dir)["status"] == "done"
    config = resolve_config(overrides)
    assert find_done(config)["run_dir"] == str(run_dir)
    (run_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "disk full"}))
    assert find_done(config) is None

    def boom(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(MemoryTrainer, "fit", boom)
    with pytest.raises(RuntimeError):
        run_experiment(overrides)
    failed = [read_status(p.parent) for p in Path(overrides["output_dir"]).rglob("config.json") if p.parent != run_dir]
    assert [(status["status"], status["error"]) for status in failed] == [("failed", "boom")]


# -- sweeps with failures --------------------------------------------------------------------------------
def test_a_sweep_whose_runs_fail_exits_non_zero_and_says_how_many(tmp_path, demo_root, capsys):
    argv = _argv(tmp_path, demo_root) + ["--category", "nowhere,elsewhere"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    sweep_dir = Path(captured.out.strip().splitlines()[-1])
    assert captured.err.strip().splitlines()[-1] == (
        f"error: 2 of 2 sweep runs failed (their errors are in {sweep_dir / 'runs.csv'})")
    assert (sweep_dir / "summary.png").stat().st_size > 0
    assert "| nowhere | failed | failed | failed | failed |" in (sweep_dir / "summary.md").read_text()


def test_a_failed_sweep_run_names_its_folder_or_says_it_had_none(tmp_path, demo_root, monkeypatch):
    original = MemoryTrainer.fit

    def fail_patchcore(self, *args, **kwargs):
        if self.config["model"]["name"] == "patchcore":
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MemoryTrainer, "fit", fail_patchcore)
    overrides = {"data.name": "demo", "data.root": str(demo_root), "model.backbone": "resnet18",
                 "model.pretrained": False, "data.image_size": 64, "eval.num_figures": 0,
                 "output_dir": str(tmp_path / "runs")}
    sweep = run_sweep(overrides, ["padim", "patchcore"], ["fabric", "nowhere"], [0])
    with open(Path(sweep["sweep_dir"]) / "runs.csv") as handle:
        rows = {(row["model"], row["category"]): row for row in csv.DictReader(handle)}
    assert rows[("padim", "fabric")]["status"] == "ok"
    failed = rows[("patchcore", "fabric")]
    assert (failed["status"], failed["error"]) == ("failed", "boom")
    assert Path(failed["run_dir"]).parent == tmp_path / "runs" / "demo" / "fabric" / "patchcore"
    assert read_status(failed["run_dir"])["status"] == "failed" and read_status(failed["run_dir"])["error"] == "boom"
    for model in ("padim", "patchcore"):  # no such category: the run failed while reading its data
        row = rows[(model, "nowhere")]
        assert row["status"] == "failed" and row["run_dir"] == "" and row["error"].endswith(NO_RUN_DIR)


def test_ctrl_c_in_a_sweep_keeps_the_summary_of_the_runs_that_finished(tmp_path, demo_root, monkeypatch, capsys):
    original, calls = MemoryTrainer.fit, []

    def interrupt_second_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MemoryTrainer, "fit", interrupt_second_run)
    assert main(_argv(tmp_path, demo_root) + ["--category", "fabric", "--seeds", "0,1,2"]) == 130
    sweeps = list((tmp_path / "runs" / "sweeps" / "demo").iterdir())
    with open(sweeps[0] / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(sweeps) == 1 and [(row["seed"], row["status"]) for row in rows] == [
        ("0", "ok"), ("1", "interrupted"), ("2", "cancelled")]
    assert (f"sweep interrupted after 1 of 3 runs; {sweeps[0] / 'runs.csv'} lists them and marks the rest"
            in capsys.readouterr().out)


def test_failed_runs_are_marked_in_the_table_and_on_the_chart(tmp_path):
    def row(model, category, seed, auroc):
        status = "failed" if auroc is None else "ok"
        return {"model": model, "category": category, "seed": seed, "status": status, "image_auroc": auroc,
                "pixel_auroc": auroc, "aupro": auroc, "separation": auroc, "run_dir": "" if auroc is None else f"r{seed}",
                "error": "boom" if auroc is None else ""}

    rows = [row("padim", "a", 0, 0.9), row("padim", "a", 1, None), row("padim", "b", 0, None),
            row("stfpm", "a", 0, 0.8), row("stfpm", "b", 0, 0.7)]
    summary = summarise(rows)
    table = markdown_table(summary, ["padim", "stfpm"], ["a", "b"])
    assert "| a | 0.9000 (1 of 2 failed) |" in table and "| b | " + "failed | " * 7 + "0.7000 |" in table
    marks = plot_summary(tmp_path / "summary.png", summary, ["padim", "stfpm"], ["a", "b"])
    assert marks == ["padim/a: 1/2 failed", "padim/b: failed"]


def test_sweep_table_and_chart_show_the_decision_at_the_threshold_beside_f1_max(tmp_path):
    """A threshold above every defect (issue 24's PaDiM on 8 images: AUROC 0.997, F1 0, accuracy 0.241) shows
    as F1 and accuracy at the threshold far below the oracle F1-max, in summary.md and summary.png."""
    rows = [{"model": "padim", "category": "bottle", "seed": 0, "status": "ok", "image_auroc": 0.997,
             "image_f1_max": 0.992, "f1": 0.0, "accuracy": 0.241, "run_dir": "r0", "error": ""}]
    summary = summarise(rows)
    table = markdown_table(summary, ["padim"], ["bottle"]).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[4:7] == ["padim F1-max (oracle)", "padim F1 at threshold", "padim accuracy at threshold"]
    assert table[2].startswith("| bottle | 0.9970 | – | – | 0.9920 | 0.0000 | 0.2410 |")
    plot_summary(tmp_path / "summary.png", summary, ["padim"], ["bottle"])
    assert Image.open(tmp_path / "summary.png").size == (1800, 720)  # 4 panels a row, two rows of 7 metrics


# -- storage ---------------------------------------------------------------------------------------------
def test_padim_stores_one_triangle_of_each_inverse_covariance_and_loads_it_bit_for_bit():
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", pretrained=False)
    model.begin_fit(6)
    model.update(torch.rand(6, 3, 64, 64))
    model.finalize()
    inverse = model.inv_covariance
    assert torch.equal(inverse, inverse.mT)
    state = model.state_dict()
    positions, dim = inverse.shape[0], inverse.shape[1]
    assert "inv_covariance" not in state and state[PACKED_KEY].shape == (positions, dim * (dim + 1) // 2)
    fresh = PadimModel(backbone="resnet18", pretrained=False)
    fresh.load_state_dict(copy.deepcopy(state))
    assert torch.equal(fresh.inv_covariance, inverse) and torch.equal(fresh.mean, model.mean)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(fresh(images)["patch_scores"], model(images)["patch_scores"])


# -- DRAEM: recomputed activations -----------------------------------------------------------------------
def _draem_step(model: DraemModel, images: torch.Tensor, masks: torch.Tensor) -> tuple[float, int]:
    """One training loss and backward pass; returns the loss and the bytes of activations kept for it."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        outputs = model(images)
        loss = model.loss(outputs, images, masks)["loss"]
    loss.backward()
    return loss.item(), sum(saved)


def test_draem_recomputation_gives_the_same_gradients_and_statistics_with_less_memory():
    torch.manual_seed(0)
    plain = DraemModel(reconstructive_width=4, discriminative_width=4, image_size=64)
    lean = copy.deepcopy(plain)
    lean.set_recompute(True)
    images, masks = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    loss, kept = _draem_step(plain, images, masks)
    lean_loss, lean_kept = _draem_step(lean, images, masks)
    assert lean_loss == loss
    for (name, p), q in zip(plain.named_parameters(), lean.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    for (name, b), c in zip(plain.named_buffers(), lean.buffers()):
        assert torch.equal(b, c), name  # running statistics updated once, not twice
    assert lean_kept < kept / 2


# -- --help --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["predict", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import runpy, sys\n"
            f"sys.argv = ['main.py', *{argv!r}]\n"
            "try:\n    runpy.run_path('main.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'numpy') if m in sys.modules))\n")
    process = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert "usage:" in process.stdout and process.stdout.strip().splitlines()[-1] == "[]"
