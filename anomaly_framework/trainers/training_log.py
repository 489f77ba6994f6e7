"""The logs of an epoch-trained run: ``history.csv`` rewritten after every epoch (so an interrupted run
keeps its curves), TensorBoard scalars when ``train.tensorboard`` is true, ``training_curves.png`` at the end.

A history entry is ``{"epoch", "train": {...}, "valid": {...}, "lr", "seconds"}``; its CSV row flattens
the splits into ``train_<name>`` / ``valid_<name>`` columns.
"""
from __future__ import annotations

import csv
from pathlib import Path

from anomaly_framework.reporting.figures import save_training_curves
from anomaly_framework.errors import FrameworkError

HISTORY_NAME = "history.csv"
CURVES_NAME = "training_curves.png"


def flatten(entry: dict) -> dict:
    """One CSV row: epoch, train_* and valid_* metrics, learning rate, seconds."""
    row = {"epoch": entry["epoch"]}
    for split in ("train", "valid"):
        row.update({f"{split}_{name}": value for name, value in entry.get(split, {}).items()})
    row.update({key: entry[key] for key in ("lr", "seconds") if key in entry})
    return row


def read_history(path: Path) -> list[dict]:
    """history.csv back as rows of floats (empty cells None; ``epoch`` an int)."""
    with Path(path).open(newline="") as handle:
        return [{key: (int(value) if key == "epoch" else float(value) if value != "" else None)
                 for key, value in row.items()} for row in csv.DictReader(handle)]


class TrainingLog:
    """Writes the run's training logs as epochs end.

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard scalars under ``run_dir/tensorboard`` (needs the package).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.writer = None
        self.logged = 0  # entries already sent to TensorBoard (a resumed run sends the earlier ones too)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise FrameworkError("train.tensorboard=true needs the tensorboard package: "
                                     "pip install 'anomaly-framework[tensorboard]'") from error
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def record(self, history: list[dict]) -> None:
        """Rewrites history.csv with every entry so far and sends the new entries' scalars."""
        rows = [flatten(entry) for entry in history]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with (self.run_dir / HISTORY_NAME).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        if self.writer is not None:
            for row in rows[self.logged:]:
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "valid_")) else key,
                                               value, row["epoch"])
            self.writer.flush()
            self.logged = len(rows)

    def close(self, history: list[dict]) -> Path | None:
        """Draws training_curves.png from the whole history and closes TensorBoard."""
        if self.writer is not None:
            self.writer.close()
        return save_training_curves(self.run_dir / CURVES_NAME, [flatten(entry) for entry in history])
