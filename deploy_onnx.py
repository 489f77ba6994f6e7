"""Scoring images with an exported ONNX file on a deployment machine: numpy, Pillow, OpenCV and onnxruntime only.

    pip install onnxruntime numpy pillow opencv-python-headless
    python deploy_onnx.py --model-file model.onnx --input new_images/

The file and its sidecar (``model.onnx.json``, written by ``export.py``) are all it needs: neither torch
nor this framework's training code is imported. It writes what ``predict.py`` writes for a run
(``predictions.csv``, ``skipped.txt``, ``<name>_overlay.png`` with the score banner), through the same
overlay code, so the two paths can be compared file by file. Images are resized and centre-cropped as the
run's dataset did (Pillow, on uint8), then handed to the graph as uint8 RGB [B, H, W, 3]; the graph
normalises, scores and thresholds.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # as dataloaders.dataloader_base
_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
# matplotlib's "jet" (its segment data), sampled into the same 256-entry table matplotlib builds.
_JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


class DeploymentError(Exception):
    """A user-facing problem (a missing file, a wrong image), reported as one line."""


def find_images(path: Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DeploymentError(f"Input '{path}' not found (give an image file or a folder of images)")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DeploymentError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under '{path}'")
    return images


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
            raise DeploymentError(f"Cannot create the output folder '{folder}': {error.strerror or error}") from error
    raise DeploymentError(f"Could not create a new output folder under '{parent}': a file is in the way")


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


def write_predictions(folder: Path, rows: list[dict], skipped: list[tuple[str, str]]) -> None:
    """``predictions.csv`` (image_path, score, label) and, if any, ``skipped.txt``."""
    with (folder / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "score", "label"])
        writer.writerows([row["image_path"], repr(row["score"]), "" if row["label"] is None else row["label"]]
                         for row in rows)
    if skipped:
        (folder / "skipped.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))


def open_rgb(path: Path) -> Image.Image:
    """Decodes an image fully into RGB, naming the file when it is unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DeploymentError(f"Cannot read image '{path}': {error} (replace or remove the file)") from error


class OnnxDetector:
    """An exported model in an onnxruntime session, with the preprocessing its sidecar describes.

    ``run(images)`` takes uint8 RGB [B, H, W, 3] at the model's input size and returns the anomaly maps
    [B, H, W], scores [B] and labels [B] (1 anomalous) the graph computes.
    """

    def __init__(self, model_file: str | Path, threads: int = 0) -> None:
        import onnxruntime

        model_file = Path(model_file)
        sidecar = Path(f"{model_file}.json")
        if not model_file.is_file():
            raise DeploymentError(f"Model file '{model_file}' not found (export one with: python main.py export ...)")
        if not sidecar.is_file():
            raise DeploymentError(f"Sidecar '{sidecar}' not found: keep the .json written by the export next to the model")
        self.info = json.loads(sidecar.read_text())
        if self.info.get("format") != "onnx":
            raise DeploymentError(f"'{model_file}' is a {self.info.get('format')} export; this runner takes ONNX files")
        contract = self.info["input"]
        self.image_size, self.resize = contract["image_size"], contract["resize"]
        self.interpolation = _INTERPOLATIONS[contract["interpolation"]]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Resize to the run's square side, centre-crop its input size: uint8 [H, W, 3], as the run's dataset."""
        image = image.resize((self.resize, self.resize), self.interpolation)
        offset = (self.resize - self.image_size) // 2
        return np.asarray(image.crop((offset, offset, offset + self.image_size, offset + self.image_size)))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise DeploymentError(f"The model takes uint8 RGB images [B, {', '.join(map(str, expected))}]; "
                                  f"got {images.dtype} {list(images.shape)} (resize with preprocess() first)")
        maps, scores, labels = self.session.run(None, {"images": images})
        return maps, scores, labels

    def map_to_original(self, anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Undoes resize + centre crop: the map goes back into the resized square (the cropped-away border
        gets the map's minimum), which is then resized to the original width × height."""
        canvas = np.full((self.resize, self.resize), anomaly_map.min(), dtype=np.float32)
        offset = (self.resize - self.image_size) // 2
        canvas[offset:offset + self.image_size, offset:offset + self.image_size] = anomaly_map
        return cv2.resize(canvas, size, interpolation=cv2.INTER_LINEAR)


def predict_onnx(model_file: str | Path, input_path: str | Path, output_dir: str | Path | None = None,
                 overlays: bool = True, batch_size: int = 8) -> dict:
    """Scores an image or a folder with an exported ONNX file; the outputs of ``predict.predict``.

    Returns:
        ``rows`` (image_path, score, label), ``skipped`` (path, reason), ``threshold``, ``output_dir``.
    """
    detector = OnnxDetector(model_file)
    paths = find_images(Path(input_path).expanduser())
    readable, inputs, skipped = [], [], []
    for path in paths:
        try:
            inputs.append(detector.preprocess(open_rgb(path)))
            readable.append(path)
        except DeploymentError as error:
            skipped.append((str(path), str(error)))
    if not readable:
        raise DeploymentError(f"None of the {len(paths)} images under '{input_path}' could be read")
    outputs = [detector.run(np.stack(inputs[start:start + batch_size])) for start in range(0, len(inputs), batch_size)]
    maps, scores, labels = (np.concatenate(part) for part in zip(*outputs))

    folder = Path(output_dir) if output_dir else new_output_dir(Path(model_file).parent / "predictions")
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image_path": str(path), "score": float(score), "label": int(label)}
            for path, score, label in zip(readable, scores, labels)]
    write_predictions(folder, rows, skipped)
    if overlays:
        low, high = float(maps.min()), float(maps.max())
        root = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
        for path, anomaly_map, row in zip(readable, maps, rows):
            image = open_rgb(path)
            heat = detector.map_to_original(anomaly_map, image.size)
            name = "__".join(path.relative_to(root).with_suffix("").parts)
            save_overlay(folder / f"{name}_overlay.png", image, heat, low, high, row["score"], detector.info["threshold"])
    return {"rows": rows, "skipped": skipped, "threshold": detector.info["threshold"], "output_dir": str(folder)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score images with an exported ONNX anomaly model.")
    parser.add_argument("--model-file", required=True, help="the .onnx file (its .onnx.json sidecar beside it)")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--output-dir", help="where to write (default <model folder>/predictions/<timestamp>)")
    parser.add_argument("--no-overlays", action="store_true", help="write the CSV only")
    args = parser.parse_args(argv)
    try:
        result = predict_onnx(args.model_file, args.input, args.output_dir, overlays=not args.no_overlays)
    except DeploymentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for _, reason in result["skipped"]:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"{len(result['rows'])} images scored, {len(result['skipped'])} skipped; threshold {result['threshold']}")
    print(result["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
