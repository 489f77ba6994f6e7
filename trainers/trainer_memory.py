"""The trainer of one-pass memory models (PaDiM, PatchCore): collect features once, then fit buffers."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from registry import TRAINER_REGISTRY
from trainers.trainer_base import BaseTrainer
from utils import StageTimer


@TRAINER_REGISTRY.register("memory")
class MemoryTrainer(BaseTrainer):
    """One pass over train/good under ``torch.inference_mode()``, then the modeler's explicit ``fit``."""

    def run_epoch(self, loader, train: bool = True, desc: str = "collect") -> dict[str, float]:
        images = 0
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
                self.modeler.training_step(batch)
                images += len(batch["label"])
        return {"images": images}

    def fit(self) -> dict:
        self.modeler.timer = StageTimer(self.device)
        start = time.perf_counter()
        loader = self.dataloader.train_loader(shuffle=False)
        self.modeler.begin_fit(len(loader.dataset))
        summary = self.run_epoch(loader, desc="fit")
        self.modeler.fit()
        self.timings.update(self.modeler.timer.as_dict("fit_"))
        self.timings["fit"] = time.perf_counter() - start
        return {"epochs": 1, "train_images": summary["images"]}
