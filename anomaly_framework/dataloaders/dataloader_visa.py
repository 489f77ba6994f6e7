"""VisA (Zou et al., ECCV 2022), read through its official one-class split ``split_csv/1cls.csv``.

The CSV lists ``object,split,label,image,mask`` with paths relative to the root; masks are
class-indexed PNGs (0 = background), binarised on loading.
"""
from __future__ import annotations

import csv

from anomaly_framework.dataloaders.dataloader_base import BaseDataloader, Sample
from anomaly_framework.registry import DATALOADER_REGISTRY
from anomaly_framework.errors import FrameworkError

VISA_LAYOUT = "<root>/split_csv/1cls.csv and <root>/<category>/Data/{Images,Masks}/..."


@DATALOADER_REGISTRY.register("visa")
class VisADataloader(BaseDataloader):
    """One VisA category (``object`` column) with the 1cls train/test split."""

    env_var = "VISA_ROOT"
    known_categories = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
                        "pcb2", "pcb3", "pcb4", "pipe_fryum")
    layout = VISA_LAYOUT

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        split_file = self.root / "split_csv" / "1cls.csv"
        if not split_file.is_file():
            raise FrameworkError(f"VisA split file '{split_file}' not found: expected {VISA_LAYOUT}")
        with split_file.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        missing = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
        if missing:
            raise FrameworkError(f"'{split_file}' lacks columns {sorted(missing)}")
        known = sorted({row["object"] for row in rows})
        rows = [row for row in rows if row["object"] == self.category]
        if not rows:
            raise FrameworkError(f"Unknown VisA category '{self.category}' in '{split_file}' (known: {known})")
        train, test = [], []
        for row in rows:
            path = self.root / row["image"]
            if not path.is_file():
                raise FrameworkError(f"Image '{path}' listed in '{split_file}' not found")
            label = int(row["label"] == "anomaly")
            mask = self.root / row["mask"] if row["mask"] else None
            if label and (mask is None or not mask.is_file()):
                raise FrameworkError(f"Mask for '{path}' missing: '{mask}' (listed in '{split_file}')")
            sample = Sample(path, label, "anomaly" if label else "good", mask if label else None)
            (train if row["split"] == "train" else test).append(sample)
        if any(sample.label for sample in train):
            raise FrameworkError(f"'{split_file}' puts anomalous images in the train split of '{self.category}'")
        return train, test
