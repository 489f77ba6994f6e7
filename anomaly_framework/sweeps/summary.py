"""A sweep's summary, rebuilt from its plan and its run folders' status and results files: ``runs.csv``
(one row per run: its status, metrics, folder and error), ``summary.csv`` (per model × category: mean and
std over seeds), ``summary.md`` (mean ± std per category and model, with a mean row) and ``summary.png``.

Built while jobs still run too (``--summarize SWEEP_DIR``): finished runs are listed with their numbers,
the others marked with their state (pending, running, interrupted, cancelled, failed with the error).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from anomaly_framework.sweeps.plan import read_plan
from anomaly_framework.utils import read_status

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_aupr", "pixel_aupr", "image_f1_max", "f1", "accuracy",
           "recall", "threshold", "separation")
TIMINGS = ("fit", "evaluate", "total")
# The decision at the run's threshold (F1, accuracy) beside the test-label oracle (F1-max): a threshold
# that labels everything one way shows as a gap there, whatever the AUROC.
TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1", "accuracy", "separation")
TABLE_LABELS = {"image_f1_max": "F1-max (oracle)", "f1": "F1 at threshold", "accuracy": "accuracy at threshold"}
UNBOUNDED = ("separation",)  # in spreads (Cohen's d); the others lie in [0, 1]


NO_RUN_DIR = "(failed before its run folder was created)"
FOLDER_STATES = {"done": "ok"}  # a run folder's status as runs.csv names it; the others keep their name
SUMMARY_FILES = ("runs.csv", "summary.csv", "summary.md", "summary.png")


def run_row(entry: dict, outcome: dict) -> dict:
    """One runs.csv row from a plan entry, its run folder and the driver's ``outcome`` (may be empty)."""
    row = {"model": entry["model"], "category": entry["category"], "seed": entry["seed"], "status": "pending",
           **dict.fromkeys(METRICS), **dict.fromkeys(f"{key}_s" for key in TIMINGS), "run_dir": "", "error": "",
           "attempts": outcome.get("attempts", 0)}
    run_dir = Path(entry["run_dir"]) if entry["run_dir"] else None
    if entry["error"]:
        return {**row, "status": "failed", "error": f"{entry['error']} {NO_RUN_DIR}"}
    if run_dir is None or not run_dir.is_dir():
        if outcome.get("error"):
            return {**row, "status": "failed", "error": f"{outcome['error']} {NO_RUN_DIR}"}
        return {**row, "status": outcome.get("state", "pending")}
    status = read_status(run_dir)
    row.update(run_dir=str(run_dir), status="skipped (done)" if entry["reused"] else
               FOLDER_STATES.get(status["status"], status["status"]),
               error=status.get("error") or status.get("message") or "")
    results_file = run_dir / "results.json"
    if status["status"] == "done" and results_file.is_file():
        results = json.loads(results_file.read_text())
        row.update({key: results.get("metrics", {}).get(key) for key in METRICS})
        row.update({f"{key}_s": results.get("timings", {}).get(key) for key in TIMINGS})
    return row


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    """runs.csv's rows of a sweep folder, as its run folders stand now."""
    plan, outcomes = read_plan(sweep_dir)
    return [run_row(entry, outcomes.get(entry["index"], {})) for entry in plan]


def write_summary(sweep_dir: str | Path) -> list[dict]:
    """(Re)writes the sweep folder's runs.csv, summary.csv, summary.md and summary.png; returns the rows."""
    sweep_dir = Path(sweep_dir)
    plan, _ = read_plan(sweep_dir)
    models = list(dict.fromkeys(entry["model"] for entry in plan))
    categories = list(dict.fromkeys(entry["category"] for entry in plan))
    rows = sweep_rows(sweep_dir)
    summary = summarise(rows)
    write_csv(sweep_dir / "runs.csv", rows)
    write_csv(sweep_dir / "summary.csv", summary)
    replace_atomically(sweep_dir / "summary.md", lambda target: target.write_text(markdown_table(summary, models, categories)))
    plot_summary(sweep_dir / "summary.png", summary, models, categories)
    return rows


FINISHED = ("ok", "skipped (done)")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per model × category: mean and std over the finished seeds of each metric and timing, and
    how many seeds failed or have not finished."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["category"]), []).append(row)
    summary = []
    for (model, category), group in groups.items():
        ok = [row for row in group if row["status"] in FINISHED]
        failed = sum(row["status"] == "failed" for row in group)
        entry = {"model": model, "category": category, "seeds": len(group), "failed": failed,
                 "unfinished": len(group) - len(ok) - failed}
        for key in (*METRICS, *(f"{t}_s" for t in TIMINGS)):
            values = [row[key] for row in ok if row.get(key) is not None]
            entry[f"{key}_mean"] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values)) if values else None
        entry["run_dirs"] = ";".join(row["run_dir"] for row in ok)
        entry["errors"] = "; ".join(f"seed {row['seed']}: {row['error']}" for row in group if row["status"] == "failed")
        summary.append(entry)
    return summary


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` then a rename: ``--summarize`` may rewrite a file while the driver does, and a
    reader never sees half of one."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(temporary)
    temporary.replace(path)


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(target: Path) -> None:
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(path, write)


def _cell(entry: dict | None, metric: str) -> str:
    if entry is None or entry.get(f"{metric}_mean") is None:
        return "failed" if entry and entry["failed"] else "–"
    text = f"{entry[f'{metric}_mean']:.4f}"
    finished = entry["seeds"] - entry["failed"] - entry.get("unfinished", 0)
    text += f" ± {entry[f'{metric}_std']:.4f}" if finished > 1 else ""
    text += f" ({entry['failed']} of {entry['seeds']} failed)" if entry["failed"] else ""
    return text + (f" ({entry['unfinished']} of {entry['seeds']} unfinished)" if entry.get("unfinished") else "")


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
    replace_atomically(path, lambda target: figure.savefig(target, dpi=100))
    plt.close(figure)
    return marks
