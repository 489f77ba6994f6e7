"""Sweeps: every model × category × seed in its own run folder, and one summary per sweep.

    python main.py --model padim,patchcore --dataset demo --category all --seeds 0,1,2

The summary folder ``<output_dir>/sweeps/<dataset>/<timestamp>/`` holds ``runs.csv`` (one row per run),
``summary.csv`` (one row per model × category: mean and std over seeds of every metric and timing, the
run folders, errors), ``summary.md`` (mean ± std per category and model, with a mean row) and
``summary.png`` (metrics per category per model). A failing combination is recorded with its error and
its run folder and the sweep goes on; Ctrl-C summarises the runs that finished; ``skip_done`` reuses any
earlier run whose resolved config is identical.
"""
from __future__ import annotations

import csv
import itertools
import json
import traceback
from pathlib import Path

import numpy as np

from anomaly_framework.config import resolve_config
from anomaly_framework.reporting.predictions import new_output_dir
from anomaly_framework.execution.distributed import broadcast_object, is_main
from anomaly_framework.main import run_experiment
from anomaly_framework.factories import dataloader_class
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import read_status

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_aupr", "pixel_aupr", "image_f1_max", "f1", "accuracy",
           "recall", "threshold", "separation")
TIMINGS = ("fit", "evaluate", "total")
# The decision at the run's threshold (F1, accuracy) beside the test-label oracle (F1-max): a threshold
# that labels everything one way shows as a gap there, whatever the AUROC.
TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1", "accuracy", "separation")
TABLE_LABELS = {"image_f1_max": "F1-max (oracle)", "f1": "F1 at threshold", "accuracy": "accuracy at threshold"}
UNBOUNDED = ("separation",)  # in spreads (Cohen's d); the others lie in [0, 1]


def split_list(text: str | None) -> list[str]:
    """``"a,b, c"`` → ``["a", "b", "c"]``; None or empty → []."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def expand_categories(config: dict, categories: list[str]) -> list[str]:
    """``all`` becomes the dataset's categories under its root; other names pass through."""
    if categories != ["all"]:
        return categories
    return dataloader_class(config["data"]["name"]).all_categories(config["data"])


def find_done(config: dict) -> dict | None:
    """results.json of an earlier run with exactly this resolved config whose status is done, if any."""
    data = config["data"]
    parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / config["model"]["name"]
    wanted = json.loads(json.dumps(config))
    for config_file in sorted(parent.glob("*/config.json"), reverse=True):
        results_file = config_file.parent / "results.json"
        if (results_file.is_file() and read_status(config_file.parent)["status"] == "done"
                and json.loads(config_file.read_text()) == wanted):
            return json.loads(results_file.read_text())
    return None


def run_sweep(overrides: dict, models: list[str], categories: list[str], seeds: list[int],
              skip_done: bool = False) -> dict:
    """Runs every combination and writes the sweep summary; returns its rows and folder.

    Under ``torchrun`` every rank takes part in every run; the process group is joined once for the whole
    sweep (each run keeps it), rank 0 alone writes the summary, and every rank returns rank 0's record.
    """
    import torch

    from anomaly_framework.execution.distributed import barrier, init_from_env
    from anomaly_framework.utils import resolve_device

    base, *_ = [resolve_config({**overrides, "model.name": model}) for model in models]  # every config error first
    categories = expand_categories(base, categories)
    _, started_group = init_from_env(resolve_device(base["device"]))
    try:
        result = _sweep(base, overrides, models, categories, seeds, skip_done)
        barrier()  # every rank past its last collective before the group goes (else rank 0 aborted at exit, 2 in 14)
        return result
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _sweep(base: dict, overrides: dict, models: list[str], categories: list[str], seeds: list[int],
           skip_done: bool) -> dict:
    from anomaly_framework.execution.distributed import broadcast_object, is_main

    combinations = list(itertools.product(models, categories, seeds))
    rows = []
    try:
        for number, (model, category, seed) in enumerate(combinations, start=1):
            print(f"\n##### sweep {number}/{len(combinations)}: {model} / {category} / seed {seed}")
            rows.append(run_one({**overrides, "model.name": model, "data.category": category, "seed": seed},
                                skip_done))
    except KeyboardInterrupt:  # Ctrl-C: the runs that finished keep their summary
        if rows and is_main():
            folder = write_summary(base, rows, models, categories)
            print(f"sweep interrupted after {len(rows)} of {len(combinations)} runs; they are summarised in {folder}")
        raise
    if not is_main():
        return broadcast_object(None)
    folder = write_summary(base, rows, models, categories)
    print((folder / "summary.md").read_text())
    failed = sum(row["status"] == "failed" for row in rows)
    if failed:
        print(f"sweep: {failed} of {len(rows)} runs failed; their errors are in {folder / 'runs.csv'}")
    return broadcast_object({"rows": rows, "summary": summarise(rows), "sweep_dir": str(folder)})


def write_summary(base: dict, rows: list[dict], models: list[str], categories: list[str]) -> Path:
    """A new sweep folder with runs.csv, summary.csv, summary.md and summary.png of ``rows``."""
    folder = new_output_dir(Path(base["output_dir"]) / "sweeps" / base["data"]["name"])
    summary = summarise(rows)
    write_csv(folder / "runs.csv", rows)
    write_csv(folder / "summary.csv", summary)
    (folder / "summary.md").write_text(markdown_table(summary, models, categories))
    plot_summary(folder / "summary.png", summary, models, categories)
    return folder


NO_RUN_DIR = "(failed before its run folder was created)"


def run_one(run_overrides: dict, skip_done: bool = False) -> dict:
    """One sweep run as a runs.csv row. A failed run keeps its folder (its status.json holds the error), or,
    when it failed before one existed, says so in ``error``."""
    model, category, seed = run_overrides["model.name"], run_overrides["data.category"], run_overrides["seed"]
    row = {"model": model, "category": category, "seed": seed, "status": "ok",
           **dict.fromkeys(METRICS), **dict.fromkeys(f"{key}_s" for key in TIMINGS), "run_dir": "", "error": ""}
    try:
        config = resolve_config(run_overrides)  # a bad config fails here on every rank alike
        # Rank 0 decides, so that no rank skips a run the others make (it may be writing that folder).
        done = broadcast_object(find_done(config) if is_main() else None) if skip_done else None
        results = done or run_experiment(run_overrides)
        row["status"] = "skipped (done)" if done else "ok"
        row["run_dir"] = results["run_dir"]
        # The other ranks of a torchrun sweep only help to fit: they have no metrics.
        row.update({key: results.get("metrics", {}).get(key) for key in METRICS})
        row.update({f"{key}_s": results.get("timings", {}).get(key) for key in TIMINGS})
    except Exception as error:  # one failing combination must not end the sweep
        row["status"] = "failed"
        row["run_dir"] = getattr(error, "run_dir", "")
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        row["error"] = message if row["run_dir"] else f"{message} {NO_RUN_DIR}"
        if not isinstance(error, FrameworkError):
            traceback.print_exc()
        print(f"sweep: {model} / {category} / seed {seed} failed: {row['error']}")
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """One row per model × category: mean and std over seeds of each metric and timing."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["category"]), []).append(row)
    summary = []
    for (model, category), group in groups.items():
        ok = [row for row in group if row["status"] != "failed"]
        entry = {"model": model, "category": category, "seeds": len(group), "failed": len(group) - len(ok)}
        for key in (*METRICS, *(f"{t}_s" for t in TIMINGS)):
            values = [row[key] for row in ok if row.get(key) is not None]
            entry[f"{key}_mean"] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values)) if values else None
        entry["run_dirs"] = ";".join(row["run_dir"] for row in ok)
        entry["errors"] = "; ".join(f"seed {row['seed']}: {row['error']}" for row in group if row["status"] == "failed")
        summary.append(entry)
    return summary


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cell(entry: dict | None, metric: str) -> str:
    if entry is None or entry.get(f"{metric}_mean") is None:
        return "failed" if entry and entry["failed"] else "–"
    text = f"{entry[f'{metric}_mean']:.4f}"
    text += f" ± {entry[f'{metric}_std']:.4f}" if entry["seeds"] - entry["failed"] > 1 else ""
    return text + (f" ({entry['failed']} of {entry['seeds']} failed)" if entry["failed"] else "")


def markdown_table(summary: list[dict], models: list[str], categories: list[str]) -> str:
    """Categories as rows; per model its image AUROC, pixel AUROC, AUPRO, F1-max, F1 and accuracy at the
    threshold, and separation (mean ± std over seeds)."""
    lookup = {(entry["model"], entry["category"]): entry for entry in summary}
    header = ["category"] + [f"{model} {TABLE_LABELS.get(metric, metric)}" for model in models for metric in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for category in categories:
        cells = [_cell(lookup.get((model, category)), metric) for model in models for metric in TABLE_METRICS]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    means = []
    for model in models:
        for metric in TABLE_METRICS:
            values = [lookup[(model, c)][f"{metric}_mean"] for c in categories
                      if (model, c) in lookup and lookup[(model, c)].get(f"{metric}_mean") is not None]
            means.append(f"{np.mean(values):.4f}" if values else "–")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(path: Path, summary: list[dict], models: list[str], categories: list[str]) -> list[str]:
    """Grouped bars: one panel per metric, categories on x, one bar per model with its std over seeds.

    Failed runs are written on the chart where their bar would be ("failed", or "1/3 failed" when some
    seeds ran); returns those labels as ``model/category: label`` for the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookup = {(entry["model"], entry["category"]): entry for entry in summary}
    marks: list[str] = []
    columns = 4
    rows = -(-len(TABLE_METRICS) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for unused in axes.flat[len(TABLE_METRICS):]:
        unused.set_visible(False)
    width = 0.8 / len(models)
    positions = np.arange(len(categories))
    for axis, metric in zip(axes.flat, TABLE_METRICS):
        for offset, model in enumerate(models):
            entries = [lookup.get((model, c)) for c in categories]
            means = [e[f"{metric}_mean"] if e and e.get(f"{metric}_mean") is not None else np.nan for e in entries]
            stds = [e[f"{metric}_std"] if e and e.get(f"{metric}_std") is not None else 0.0 for e in entries]
            axis.bar(positions + offset * width, means, width, yerr=stds, label=model, capsize=2)
            for position, category, entry, mean in zip(positions, categories, entries, means):
                if entry and entry["failed"]:
                    label = "failed" if np.isnan(mean) else f"{entry['failed']}/{entry['seeds']} failed"
                    axis.text(position + offset * width, 0.02 if np.isnan(mean) else mean + 0.02, label,
                              rotation=90, ha="center", va="bottom", color="red", fontsize=7)
                    if metric == TABLE_METRICS[0]:
                        marks.append(f"{model}/{category}: {label}")
        axis.set_xticks(positions + width * (len(models) - 1) / 2, categories, rotation=45, ha="right")
        axis.set_title(TABLE_LABELS.get(metric, metric))
        if metric not in UNBOUNDED:
            axis.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=8)
    failed = sum(entry["failed"] for entry in summary)
    if failed:
        total = sum(entry["seeds"] for entry in summary)
        figure.suptitle(f"{failed} of {total} runs failed (see runs.csv)", color="red", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return marks
