"""Tiling of a large image into model-sized tiles and the stitching of their maps back, torch-free.

One code for the framework's tiled modelers (torch tensors) and the ONNX runner (numpy arrays): the
functions only slice and add, which both array types do alike. Tiles lie on a grid of ``stride`` steps
from the top-left corner; when the side is not a whole number of steps the last tile is moved inward to
end at the border (so every tile is full size and every pixel is covered). Overlapping maps are averaged:
each pixel's value is the mean over the tiles covering it. Coverage counts along the two axes multiply, so
the averaging needs no full-size weight array (the stitched sum is the only full-size array per image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from anomaly_framework.errors import FrameworkError


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2·stride, ... and a last tile ending at ``length``."""
    if not 0 < stride <= tile <= length:
        raise FrameworkError(f"Tiling needs 0 < tile stride ({stride}) <= tile size ({tile}) <= image side ({length})")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def check_holds_tile(path: Path, size: tuple[int, int], tile: int | None) -> None:
    """At ``data.image_size=native`` an image of (width, height) ``size`` is cut as it is: refuses one
    smaller than a tile in either side, naming the file."""
    if tile is not None and min(size) < tile:
        raise FrameworkError(f"Image '{path}' is {size[0]}x{size[1]}, smaller than data.tile_size={tile} "
                             f"(data.image_size=native reads it at its own size): remove it or lower data.tile_size")


def tile_origins(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of every tile, row by row: the order of tiles everywhere."""
    return [(y, x) for y in tile_starts(height, tile, stride) for x in tile_starts(width, tile, stride)]


def tiles_per_image(height: int, width: int, tile: int, stride: int) -> int:
    return len(tile_starts(height, tile, stride)) * len(tile_starts(width, tile, stride))


def coverage(length: int, tile: int, stride: int) -> np.ndarray:
    """How many tiles cover each position along one axis (float32 [length])."""
    counts = np.zeros(length, dtype=np.float32)
    for start in tile_starts(length, tile, stride):
        counts[start:start + tile] += 1
    return counts


def cut(image: Any, origins: Sequence[tuple[int, int]], tile: int) -> list[Any]:
    """Views of ``image`` [..., H, W] at ``origins`` (no copies)."""
    return [image[..., y:y + tile, x:x + tile] for y, x in origins]


def tile_chunks(counts: Sequence[int], chunk: int) -> Iterator[list[tuple[int, int]]]:
    """(image, tile) pairs of a batch whose images have ``counts`` tiles each (they differ at
    ``data.image_size=native``), image by image, ``chunk`` at a time: the backbone's batches."""
    pairs = [(image, index) for image, tiles in enumerate(counts) for index in range(tiles)]
    for start in range(0, len(pairs), chunk):
        yield pairs[start:start + chunk]


def add_tiles(total: Any, tile_maps: Sequence[Any], pairs: Sequence[tuple[int, int]],
              origins: Sequence[tuple[int, int]]) -> None:
    """Adds each tile's map [..., t, t] into ``total`` [N, ..., H, W] at its image and origin, in place."""
    for tile_map, (image, index) in zip(tile_maps, pairs):
        y, x = origins[index]
        height, width = tile_map.shape[-2:]
        total[image, ..., y:y + height, x:x + width] += tile_map


def overlap_weights(height: int, width: int, tile: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """1 / coverage along rows [H, 1] and columns [1, W]: a stitched sum times both is the overlap mean."""
    rows = 1.0 / coverage(height, tile, stride)
    cols = 1.0 / coverage(width, tile, stride)
    return rows[:, None], cols[None, :]


def stitch(tile_maps: np.ndarray, height: int, width: int, tile: int, stride: int) -> np.ndarray:
    """Maps of one image's tiles [T, t, t] (``tile_origins`` order) → the overlap-averaged map [H, W]."""
    origins = tile_origins(height, width, tile, stride)
    if len(tile_maps) != len(origins):
        raise FrameworkError(f"{len(tile_maps)} tile maps for {len(origins)} tiles of a {height}x{width} image")
    total = np.zeros((1, height, width), dtype=np.float32)
    add_tiles(total, tile_maps, [(0, index) for index in range(len(origins))], origins)
    rows, cols = overlap_weights(height, width, tile, stride)
    total[0] *= rows
    total[0] *= cols
    return total[0]
