"""The evaluation protocol's geometry, on uint8 images: resize to a square, centre-crop the model input,
and the way back from a map at the model input to the original image. Shared by the datasets, ``predict``
and the ONNX runner, so all three see and draw the same pixels."""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from anomaly_framework.errors import FrameworkError

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def interpolation_code(name: str) -> int:
    """Pillow's resampling code of ``data.interpolation``."""
    if name not in INTERPOLATIONS:
        raise FrameworkError(f"data.interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def crop_offset(resize: int, size: int) -> int:
    return (resize - size) // 2


def resize_and_crop(image: Image.Image, resize: int, size: int, interpolation: int) -> Image.Image:
    """Resize to a ``resize`` square, then centre-crop a ``size`` square: what the model sees."""
    image = image.resize((resize, resize), interpolation)
    offset = crop_offset(resize, size)
    return image.crop((offset, offset, offset + size, offset + size))


def map_to_original(anomaly_map: np.ndarray, resize: int | None, size: int | str, original: tuple[int, int]) -> np.ndarray:
    """Undoes resize + centre crop for a map [h, w] over the model input: the map (bilinearly brought to
    ``size`` if it is smaller) goes back into the resized square, the cropped-away border gets the map's
    minimum, and the square is resized to the ``original`` (width, height). ``resize`` None
    (``data.image_size=native``): the input was the original itself, the map is only brought to its size."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if resize is None:
        same = anomaly_map.shape == (original[1], original[0])
        return anomaly_map if same else cv2.resize(anomaly_map, original, interpolation=cv2.INTER_LINEAR)
    if anomaly_map.shape != (size, size):
        anomaly_map = cv2.resize(anomaly_map, (size, size), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((resize, resize), anomaly_map.min(), dtype=np.float32)
    offset = crop_offset(resize, size)
    canvas[offset:offset + size, offset:offset + size] = anomaly_map
    return cv2.resize(canvas, original, interpolation=cv2.INTER_LINEAR)
