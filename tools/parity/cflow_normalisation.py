"""The effect of CFlow's test-time normalisation on a finished run: the official one (each level's maximum
and the map's maximum over the whole test split) against ours (fitted per-level maxima, shift = levels).

    python tools/parity/cflow_normalisation.py RUN_DIR

Prints image AUROC and pixel AUROC (at the input resolution) of both on the run's test split.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomaly_framework.factories import build_dataloader
from anomaly_framework.inference.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args()
    modeler, checkpoint = load_checkpoint(args.run_dir)
    model = modeler.model
    dataloader = build_dataloader(checkpoint["config"])
    log_probs, labels, masks = [], [], []
    with torch.no_grad():
        for batch in dataloader.test_loader():
            log_probs.append(model(batch["image"])["log_prob"])
            labels.append(batch["label"])
            masks.append(batch["mask"])
    outputs = {"log_prob": [torch.cat(level) for level in zip(*log_probs)]}
    size = masks[0].shape[-2:]
    labels, masks = torch.cat(labels).numpy(), torch.cat(masks).numpy().astype(bool)
    maps = {"official (test-set maxima)": model.anomaly_map(outputs, size),
            "ours (fitted maxima)": model.anomaly_map(outputs, size, model.log_prob_max.unbind(),
                                                      float(len(outputs["log_prob"])))}
    for name, values in maps.items():
        values = values.double().numpy()
        print(f"{name}: image AUROC {roc_auc_score(labels, values.max(axis=(1, 2, 3))):.4f}, "
              f"pixel AUROC {roc_auc_score(masks.ravel(), values.ravel()):.4f}")


if __name__ == "__main__":
    main()
