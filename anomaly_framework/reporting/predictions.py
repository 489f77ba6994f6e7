"""What a prediction writes, for ``predict`` and the ONNX runner alike (numpy, Pillow, OpenCV; no torch): fresh output
folders, ``predictions.csv`` / ``skipped.txt``, and heat-map overlays with their score banner."""
from __future__ import annotations

import csv
import datetime as dt
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anomaly_framework.errors import FrameworkError
from anomaly_framework.images.decode import open_image
from anomaly_framework.images.geometry import map_to_original

# matplotlib's "jet" (its segment data), sampled into the same 256-entry table matplotlib builds.
_JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def new_output_dir(parent: Path) -> Path:
    """A fresh folder under ``parent``; an earlier prediction is never overwritten."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        folder = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            if not folder.is_dir():  # a file in the way, here or above
                break
        except OSError as error:  # a parent that is a file, no permission, a read-only disk
            raise FrameworkError(f"Cannot create the output folder '{folder}': {error.strerror or error}") from error
    raise FrameworkError(f"Could not create a new output folder under '{parent}': a file is in the way")


def jet(values: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of matplotlib's jet colour map for values in [0, 1] (same 256-colour table)."""
    positions = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(positions, *zip(*_JET_SEGMENTS[c])) for c in ("red", "green", "blue")], axis=1)
    return table[np.clip((values * 256).astype(np.int64), 0, 255)]


def label_text(label: int) -> str:
    return "anomalous" if label else "normal"


def short_verdicts(score: float, threshold: float | None) -> list[str]:
    """The score and predicted label, longest first (``score 3.2: anomalous (threshold 2.9)``, then
    ``3.2 anomalous``), for the band across an image of any width."""
    if threshold is None:
        return [f"score {score:.4g} (no threshold)", f"{score:.3g}"]
    label = label_text(int(score >= threshold))
    return [f"score {score:.4g}: {label} (threshold {threshold:.4g})", f"{score:.3g} {label}"]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def banner(image: Image.Image, texts: list[str], anomalous: bool | None) -> Image.Image:
    """``image`` with text on a dark translucent band across its top (red when predicted anomalous, green
    when normal); the size stays the image's own, so the overlay keeps its pixel grid.

    Letters are 1/28 of the image width high (at least 12 px), made smaller (down to 9 px) where a text
    would not fit the width; the first of ``texts`` (longest first) that fits is written."""
    for text in texts:
        size = max(12, image.width // 28)
        while size > 9 and _font(size).getlength(text) > image.width - size:
            size -= 1
        if _font(size).getlength(text) <= image.width - size:
            break
    font = _font(size)
    height = min(int(size * 1.8), image.height)
    framed = image.convert("RGB")
    band = np.asarray(framed.crop((0, 0, image.width, height)), dtype=np.float32) * 0.25 + 0.75 * 20
    framed.paste(Image.fromarray(band.round().astype(np.uint8)), (0, 0))
    colour = (255, 255, 255) if anomalous is None else (255, 90, 90) if anomalous else (120, 230, 120)
    ImageDraw.Draw(framed).text((size // 2, (height - size) // 2), text, fill=colour, font=font)
    return framed


def save_overlay(path: Path, image: Image.Image, heat: np.ndarray, low: float, high: float,
                 score: float | None = None, threshold: float | None = None) -> None:
    """The image with a jet heat map blended over it (45 %), at the image's own resolution; with ``score``,
    a band across its top carries the score and the label predicted at ``threshold``."""
    scaled = np.clip((heat - low) / max(high - low, 1e-12), 0, 1)
    colours = (jet(scaled) * 255).astype(np.float32)
    blended = 0.55 * np.asarray(image, dtype=np.float32) + 0.45 * colours
    overlay = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    if score is not None:
        anomalous = None if threshold is None else score >= threshold
        overlay = banner(overlay, short_verdicts(score, threshold), anomalous)
    overlay.save(path)


# The normalised score puts the threshold at 0.5 (as other tools do) and the median normal calibration image
# at 0.1: a logistic curve, monotone (no ties, unlike clipping to [0, 1]) and defined for any raw score.
NORMALIZED_FORMULA = "0.5 * (1 + tanh((score - threshold) / (2 * scale))), scale = (threshold - median normal score) / ln 9"


def score_scale(threshold: float, normal_scores: np.ndarray) -> float:
    """The normalised score's spread: (threshold − median normal calibration score) / ln 9, so that median
    lands at 0.1; where the threshold is not above that median (budgets ≥ 0.5), their standard deviation."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    spread = threshold - float(np.median(normal_scores))
    if spread <= 0:
        spread = float(normal_scores.std()) or max(abs(threshold), 1.0)
    return spread / math.log(9.0)


def normalized_score(score: float, threshold: float | None, scale: float | None) -> float | None:
    """1 / (1 + exp(−(score − threshold)/scale)) (written with tanh, which never overflows): 0.5 at the
    threshold, above it exactly when the label is anomalous; None without a threshold or a scale."""
    if threshold is None or scale is None:
        return None
    return 0.5 * (1.0 + math.tanh((score - threshold) / (2.0 * scale)))


def save_overlays(folder: Path, input_path: Path, paths: Sequence[Path], maps: Sequence[np.ndarray], scores: Sequence[float],
                  threshold: float | None, resize: int | None, image_size: int | str,
                  wrap: Callable[[Iterable], Iterable] = lambda items: items) -> None:
    """``<name>_overlay.png`` for every scored image (``maps`` [N, h, w] at the model input; native size: a
    list of maps at their images' sizes, ``resize`` None): each map taken back to its image's own size, one
    colour range over all maps, the score banner at ``threshold``. ``wrap`` may decorate the loop
    (``predict``'s progress bar)."""
    low, high = min(float(heat.min()) for heat in maps), max(float(heat.max()) for heat in maps)
    root = input_path if input_path.is_dir() else input_path.parent
    for path, anomaly_map, score in wrap(list(zip(paths, maps, scores))):
        image = open_image(path, "RGB")
        heat = map_to_original(anomaly_map, resize, image_size, image.size)
        name = "__".join(path.relative_to(root).with_suffix("").parts)
        save_overlay(folder / f"{name}_overlay.png", image, heat, low, high, score, threshold)


def write_predictions(folder: Path, rows: list[dict], skipped: list[tuple[str, str]]) -> None:
    """``predictions.csv`` (image_path, score, normalized_score, label) and, if any, ``skipped.txt``."""
    def cell(value) -> str:
        return "" if value is None else repr(value)
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "score", "normalized_score", "label"])
        writer.writerows([row["image_path"], repr(row["score"]), cell(row["normalized_score"]), cell(row["label"])]
                         for row in rows)
    if skipped:
        (folder / "skipped.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
