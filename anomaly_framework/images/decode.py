"""The one image decoder: every path that reads a user's file (training, evaluation, ``predict``, the ONNX
runner) goes through ``open_image`` / ``open_mask``, so a file means the same pixels everywhere.

Files are decoded upright (EXIF orientation applied); 16- and 32-bit grayscale is scaled from its full
16-bit range (Pillow's own conversion clips it to white); palette and grayscale(+alpha) images convert as
Pillow does, alpha dropped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from anomaly_framework.errors import FrameworkError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes of 16-bit (and 32-bit) grayscale PNG / TIFF
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted, any common suffix in any case."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def find_images(path: Path) -> list[Path]:
    """One image, or every image under a folder (recursively, sorted): what ``predict`` scores."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FrameworkError(f"Input '{path}' not found (give an image file or a folder of images)")
    images = sorted(p for p in path.rglob("*") if is_image_file(p))
    if not images:
        raise FrameworkError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under '{path}'")
    return images


def _unreadable(path: Path, error: Exception) -> FrameworkError:
    return FrameworkError(f"Cannot read image '{path}': {error} (replace or remove the file)")


def decode_upright(path: Path) -> Image.Image:
    """Decodes an image fully, upright (EXIF orientation applied), naming the file when it is unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """An image in ``mode`` (8 bits per channel), whatever it was stored as."""
    image = decode_upright(path)
    if image.mode in _WIDE_GRAY:
        scaled = np.asarray(image).astype(np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    return image.convert(mode)


def open_mask(path: Path) -> Image.Image:
    """A binary mask, 255 where the stored value is non-zero (binary 0/255 masks, VisA's class indices).

    Values are read as stored, not as colours: a palette mask's indices, a 16-bit mask's integers, any
    non-zero colour channel (alpha ignored); converting to gray first would lose classes of dark colour.
    """
    image = decode_upright(path)
    values = np.asarray(image)
    if values.ndim == 3:
        channels = 1 if image.mode == "LA" else 3 if image.mode in ("RGB", "RGBA") else values.shape[2]
        values = values[..., :channels].any(axis=2)
    return Image.fromarray(np.where(values != 0, 255, 0).astype(np.uint8), "L")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), read from the header only."""
    if image.format == "PNG":  # Pillow's getexif() decodes a PNG's pixels to look for an eXIf chunk after them
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        return exif.get(0x0112, 1)
    return image.getexif().get(0x0112, 1)


def header_size(path: Path) -> tuple[int, int]:
    """Upright (width, height) from the file's header, its structure verified (PNG chunk checksums) but not decoded."""
    try:
        with Image.open(path) as image:
            size, orientation = image.size, _orientation(image)
            image.verify()
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size  # these orientations swap the axes
