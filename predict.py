"""Scoring new images with a saved run: ``python main.py predict --checkpoint RUN_DIR --input PATH``.

Everything comes from the checkpoint: the weights, the preprocessing (the run's ``data`` config) and the
threshold, so a folder scored here gets exactly the scores the run gave the same images. Images of any
size and mode (grayscale, RGBA) are accepted; unreadable files are listed and skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from anomaly_framework import deploy_onnx
from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, Sample, open_image
from anomaly_framework.utils import FrameworkError


def find_images(path: Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted): the deployment runner's search."""
    try:
        return deploy_onnx.find_images(path)
    except deploy_onnx.DeploymentError as error:
        raise FrameworkError(str(error)) from error


def new_output_dir(parent: Path) -> Path:
    """A fresh folder under ``parent``, never an earlier prediction's: the deployment runner's rule."""
    try:
        return deploy_onnx.new_output_dir(parent)
    except deploy_onnx.DeploymentError as error:
        raise FrameworkError(str(error)) from error


def map_to_original(anomaly_map: torch.Tensor, dataset: AnomalyDataset, size: tuple[int, int]) -> np.ndarray:
    """Undoes resize + centre crop: the map goes back into the resized square (the cropped-away border
    gets the map's minimum), which is then resized to the original width × height."""
    low = float(anomaly_map.min())
    canvas = torch.full((1, 1, dataset.resize, dataset.resize), low)
    offset = (dataset.resize - dataset.image_size) // 2
    side = anomaly_map.shape[-1]
    if side != dataset.image_size:
        anomaly_map = F.interpolate(anomaly_map[None, None], size=(dataset.image_size,) * 2, mode="bilinear",
                                    align_corners=False)[0, 0]
    canvas[0, 0, offset:offset + dataset.image_size, offset:offset + dataset.image_size] = anomaly_map
    width, height = size
    return F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


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
        ``rows`` (image_path, score, label), ``skipped`` (path, reason), ``threshold``, ``output_dir``.
    """
    from anomaly_framework.main import load_checkpoint

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
    loader = DataLoader(Subset(dataset, readable), batch_size=config["data"]["batch_size"], shuffle=False)
    scores, maps = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="predict", leave=False, dynamic_ncols=True):
            output = modeler.evaluate_step(batch)
            scores.append(output["anomaly_scores"].float().cpu())
            maps.append(output["anomaly_maps"].float().cpu())
    scores_all, maps_all = torch.cat(scores), torch.cat(maps)

    rows = [{"image_path": str(paths[index]), "score": float(score),
             "label": (int(score >= threshold) if threshold is not None else None)}
            for index, score in zip(readable, scores_all.tolist())]
    deploy_onnx.write_predictions(folder, rows, skipped)
    if overlays:
        low, high = float(maps_all.min()), float(maps_all.max())
        root = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
        for position, index in enumerate(tqdm(readable, desc="overlays", leave=False, dynamic_ncols=True)):
            image = open_image(paths[index], "RGB")
            heat = map_to_original(maps_all[position, 0], dataset, image.size)
            name = "__".join(paths[index].relative_to(root).with_suffix("").parts)
            deploy_onnx.save_overlay(folder / f"{name}_overlay.png", image, heat, low, high, rows[position]["score"], threshold)
    return {"rows": rows, "skipped": skipped, "threshold": threshold, "output_dir": str(folder)}
