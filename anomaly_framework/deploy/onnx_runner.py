"""Scoring images with an exported ONNX file on a deployment machine: numpy, Pillow, OpenCV and onnxruntime only.

    pip install --no-deps anomaly_framework-<version>-py3-none-any.whl   # the wheel: pip wheel --no-deps .
    pip install onnxruntime numpy pillow opencv-python-headless
    python -m anomaly_framework.deploy.onnx_runner --model-file model.onnx --input new_images/

The file and its sidecar (``model.onnx.json``, written by ``export``) are all it needs: neither torch nor
the framework's training code is imported (the package's torch-free parts: ``errors``, ``images``,
``reporting.predictions``). It writes what ``predict`` writes for a run (``predictions.csv``, ``skipped.txt``,
``<name>_overlay.png`` with the score banner) through the same decoder, geometry and overlay code, so the
two paths can be compared file by file. Images are resized and centre-cropped as the run's dataset did,
then handed to the graph as uint8 RGB [B, H, W, 3]; the graph normalises, scores and thresholds.
A tiled run's graph takes tiles: the runner cuts each image into the sidecar's tiles, runs them in batches
and stitches their maps (``images.tiling``, the code the framework's modelers use), the score being the
stitched map's maximum and the label score ≥ threshold, as the eager tiled model computes them. A run at
``data.image_size=native`` reads each image at its own size (no resize, no crop), cut on its own grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_framework.errors import FrameworkError
from anomaly_framework.images.decode import find_images, open_image
from anomaly_framework.images.geometry import interpolation_code, resize_and_crop
from anomaly_framework.images.tiling import check_holds_tile, cut, stitch, tile_origins
from anomaly_framework.reporting.predictions import new_output_dir, normalized_score, save_overlays, write_predictions


class OnnxDetector:
    """An exported model in an onnxruntime session, with the preprocessing its sidecar describes.

    ``run(images)`` takes uint8 RGB [B, H, W, 3] at the graph's input size (a tiled run's tile) and returns
    the anomaly maps [B, H, W], scores [B] and labels [B] (1 anomalous) the graph computes; ``detect(images)``
    takes them at the run's image size, tiling and stitching where the run did.
    """

    def __init__(self, model_file: str | Path, threads: int = 0) -> None:
        import onnxruntime

        model_file = Path(model_file)
        sidecar = Path(f"{model_file}.json")
        if not model_file.is_file():
            raise FrameworkError(f"Model file '{model_file}' not found (export one with: python main.py export ...)")
        if not sidecar.is_file():
            raise FrameworkError(f"Sidecar '{sidecar}' not found: keep the .json written by the export next to the model")
        self.info = json.loads(sidecar.read_text())
        if self.info.get("format") != "onnx":
            raise FrameworkError(f"'{model_file}' is a {self.info.get('format')} export; this runner takes ONNX files")
        contract = self.info["input"]
        self.image_size, self.resize = contract["image_size"], contract["resize"]
        self.tile_size, self.tile_stride = contract.get("tile_size"), contract.get("tile_stride")
        self.tile_group = contract.get("tile_group") or 1  # > 1: an image's tiles go in together (tiled ensemble)
        self.input_size = self.tile_size or self.image_size
        self.interpolation = interpolation_code(contract["interpolation"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    @property
    def native(self) -> bool:
        """The run read each image at its own size (``data.image_size=native``): no resize, no crop."""
        return self.image_size == "native"

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Resize to the run's square side, centre-crop its input size (native: the image as it is):
        uint8 [H, W, 3], as the run's dataset."""
        if self.native:
            return np.asarray(image)
        return np.asarray(resize_and_crop(image, self.resize, self.image_size, self.interpolation))

    def load(self, path: Path) -> np.ndarray:
        """An image file as the graph's input: the framework's decoder, then ``preprocess``."""
        image = open_image(path, "RGB")
        if self.native:
            check_holds_tile(path, image.size, self.tile_size)
        return self.preprocess(image)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        expected = (self.input_size, self.input_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise FrameworkError(f"The model takes uint8 RGB images [B, {', '.join(map(str, expected))}]; "
                                 f"got {images.dtype} {list(images.shape)} (resize with preprocess() first)")
        maps, scores, labels = self.session.run(None, {"images": images})
        return maps, scores, labels

    def detect(self, images: np.ndarray | list[np.ndarray],
               batch_size: int = 8) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, np.ndarray]:
        """Maps [B, H, W], scores and labels of uint8 RGB images at the run's image size (``preprocess``);
        native size: a list of images [H, W, 3] of their own sizes in, a list of their maps out."""
        if self.tile_size is None:
            return self.run(images)
        size, stride = self.tile_size, self.tile_stride
        maps = []
        for image in images:
            height, width = image.shape[:2]
            tiles = np.stack(cut(image.transpose(2, 0, 1), tile_origins(height, width, size, stride), size))
            tiles = tiles.transpose(0, 2, 3, 1)  # [T, t, t, 3]
            step = len(tiles) if self.tile_group > 1 else batch_size
            tile_maps = [self.run(np.ascontiguousarray(tiles[start:start + step]))[0]
                         for start in range(0, len(tiles), step)]
            maps.append(stitch(np.concatenate(tile_maps), height, width, size, stride))
        scores = np.array([heat.max() for heat in maps])
        labels = (scores.astype(np.float64) >= self.info["threshold"]).astype(np.int64)
        return (maps if self.native else np.stack(maps)), scores, labels


def predict_onnx(model_file: str | Path, input_path: str | Path, output_dir: str | Path | None = None,
                 overlays: bool = True, batch_size: int = 8) -> dict:
    """Scores an image or a folder with an exported ONNX file; the outputs of ``predict.predict``.

    Returns:
        ``rows`` (image_path, score, normalized_score, label), ``skipped`` (path, reason), ``threshold``,
        ``output_dir``.
    """
    detector = OnnxDetector(model_file)
    paths = find_images(Path(input_path).expanduser())
    readable, inputs, skipped = [], [], []
    for path in paths:
        try:
            inputs.append(detector.load(path))
            readable.append(path)
        except FrameworkError as error:
            skipped.append((str(path), str(error)))
    if not readable:
        raise FrameworkError(f"None of the {len(paths)} images under '{input_path}' could be read")
    batches = [inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size)]
    outputs = [detector.detect(batch if detector.native else np.stack(batch)) for batch in batches]
    maps = [heat for output in outputs for heat in output[0]]  # native: each at its own size
    scores, labels = (np.concatenate(part) for part in list(zip(*outputs))[1:])

    folder = Path(output_dir) if output_dir else new_output_dir(Path(model_file).parent / "predictions")
    folder.mkdir(parents=True, exist_ok=True)
    threshold, scale = detector.info["threshold"], detector.info.get("score_scale")
    rows = [{"image_path": str(path), "score": float(score), "normalized_score": normalized_score(float(score), threshold, scale),
             "label": int(label)} for path, score, label in zip(readable, scores, labels)]
    write_predictions(folder, rows, skipped)
    if overlays:
        save_overlays(folder, Path(input_path), readable, maps, [row["score"] for row in rows], threshold,
                      detector.resize, detector.image_size)
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
    except FrameworkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for _, reason in result["skipped"]:
        print(f"skipped: {reason}", file=sys.stderr)
    print(f"{len(result['rows'])} images scored, {len(result['skipped'])} skipped; threshold {result['threshold']}")
    print(result["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
