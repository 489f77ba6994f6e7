"""Scoring new images with a saved run: ``python main.py predict --checkpoint RUN_DIR --input PATH``.

Everything comes from the checkpoint: the weights, the preprocessing (the run's ``data`` config) and the
threshold, so a folder scored here gets exactly the scores the run gave the same images. Images of any
size and mode (grayscale, RGBA) are accepted; unreadable files are listed and skipped.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, Sample, collate_native
from anomaly_framework.images.decode import find_images
from anomaly_framework.reporting.predictions import new_output_dir, normalized_score, save_overlays, write_predictions
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.errors import FrameworkError
from anomaly_framework.ops.ragged import joined


def predict(checkpoint: str | Path, input_path: str | Path, output_dir: str | Path | None = None,
            device: str = "cpu", overlays: bool = True) -> dict:
    """Scores an image or a folder with a saved run.

    Args:
        checkpoint: a run folder or its checkpoint.pt.
        input_path: an image or a folder (searched recursively).
        output_dir: where predictions.csv and overlays go; default ``<run>/predictions/<timestamp>``.
        device: cpu, cuda or auto.
        overlays: also write ``<name>_overlay.png`` heat maps at each image's original resolution.

    Returns:
        ``rows`` (image_path, score, normalized_score: 0.5 at the threshold, label), ``skipped`` (path,
        reason), ``threshold``, ``output_dir``.
    """
    modeler, saved = load_checkpoint(checkpoint, device)
    config, threshold = saved["config"], saved["threshold"]
    paths = find_images(Path(input_path).expanduser())
    dataset = AnomalyDataset([Sample(path, 0, "unknown") for path in paths], config["data"])
    readable, skipped = [], []
    for index, path in enumerate(paths):
        try:
            dataset.load(index)  # decodes once into the image cache (data.cache); the loader below reuses it
            readable.append(index)
        except FrameworkError as error:
            skipped.append((str(path), str(error)))
    if not readable:
        raise FrameworkError(f"None of the {len(paths)} images under '{input_path}' could be read")
    # Before scoring: a folder that cannot be made is found at once.
    checkpoint_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    folder = Path(output_dir) if output_dir else new_output_dir(checkpoint_dir / "predictions")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FrameworkError(f"Cannot create the output folder '{folder}' (--output-dir): "
                             f"{error.strerror or error}") from error
    loader = DataLoader(Subset(dataset, readable), batch_size=config["data"]["batch_size"], shuffle=False,
                        collate_fn=collate_native if dataset.native else None)  # native: each file at its own size
    scores, maps = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="predict", leave=False, dynamic_ncols=True):
            output = modeler.evaluate_step(batch)
            scores.append(output["anomaly_scores"].float().cpu())
            maps.append([heat.float().cpu() for heat in output["anomaly_maps"]])
    scores_all, maps_all = torch.cat(scores), joined(maps)

    scale = saved.get("score_scale")
    rows = [{"image_path": str(paths[index]), "score": float(score),
             "normalized_score": normalized_score(score, threshold, scale),
             "label": (int(score >= threshold) if threshold is not None else None)}
            for index, score in zip(readable, scores_all.tolist())]
    write_predictions(folder, rows, skipped)
    if overlays:
        save_overlays(folder, Path(input_path), [paths[index] for index in readable], [heat[0].numpy() for heat in maps_all],
                      [row["score"] for row in rows], threshold, dataset.resize, dataset.image_size,
                      wrap=lambda items: tqdm(items, desc="overlays", leave=False, dynamic_ncols=True))
    return {"rows": rows, "skipped": skipped, "threshold": threshold, "output_dir": str(folder)}
