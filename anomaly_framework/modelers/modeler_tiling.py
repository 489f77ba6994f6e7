"""Tiled inference and training for every model with a feature backbone (``data.tile_size``, ``data.tile_stride``).

The image is read at ``data.image_size``; the model only ever sees ``tile_size`` squares. Tiles are cut
on the grid of ``images.tiling`` and go through the model ``data.batch_size`` at a time (the backbone's
batches); their maps, computed by the model's own hooks at the tile size, are added into one full-size
sum per image and averaged where tiles overlap. The image score is the maximum of that stitched map, for
every model (a tile's own image score, e.g. PatchCore's re-weighted one, sees only its tile).

Training: a batch of B images becomes the B·T tiles of its images (a memory model collects them a chunk
at a time; a gradient model takes one step on all of them), so one statistic set is shared by all tile
positions (PaDiM with ``model.tile_ensemble=false``: one Gaussian per position within the tile, fitted on
every tile). Cached backbone features of an image are its tiles' features, stacked [T, C, h, w] per stage.
The fit's own images are scored leave-one-tile-out: each tile as if its own features had been left out.

PaDiM's tiled ensemble (``model.tile_ensemble``, its default on a fixed grid): one Gaussian set per tile
position, so the model takes whole images' tiles in tile order (``tile_group``), ``data.batch_size`` images
a call, and scores the fit's own images leave-one-image-out (an image adds one sample to each Gaussian).

``data.image_size=native``: each image keeps its own size, so a batch holds lists (images [3, H, W], masks,
cached features [T, C, h, w] per image and stage, the number T of tiles differing by image); each image
is cut on its own grid and its map stitched at its own size (maps come back as a list of [1, H, W]).
"""
from __future__ import annotations

from itertools import accumulate
from typing import Iterator

import torch

from anomaly_framework.errors import FrameworkError
from anomaly_framework.images.tiling import add_tiles, cut, overlap_weights, tile_chunks, tile_origins, tiles_per_image


class TilingMixin:
    """Cuts, streams and stitches tiles for ``BaseModeler`` (needs ``config``, ``model``, ``device``,
    ``timer``, ``forward``, ``images`` and ``maps_from_outputs``). Untiled, every method is the identity."""

    # The export traces the model on one tile and leaves the tiling to its runner.
    tiling_enabled = True
    # Native size: the position of each fit image's first tile in the fit (the trainer sets it from the
    # images' sizes), for leave-one-tile-out; square images have T tiles each, image p's first is p·T.
    fit_tile_offsets: torch.Tensor | None = None

    @property
    def tiling(self) -> tuple[int, int] | None:
        """(tile size, stride) when the config tiles, else None."""
        data = (self.config or {}).get("data", {})
        size = data.get("tile_size")
        if size is None or not self.tiling_enabled:
            return None
        return size, data.get("tile_stride") or size

    @property
    def native(self) -> bool:
        """``data.image_size=native``: every image read at its own size (batches hold lists)."""
        return (self.config or {}).get("data", {}).get("image_size") == "native"

    def tiles_of(self, height: int, width: int) -> int:
        """Tiles of one image of that size (1 untiled)."""
        return 1 if self.tiling is None else tiles_per_image(height, width, *self.tiling)

    def _chunk(self) -> int:
        """Tiles per model call: ``data.batch_size``; a tiled ensemble's, ``data.batch_size`` whole images."""
        return self.config["data"]["batch_size"] * self.tile_group()

    def tiles_per_image(self) -> int:
        """Tiles of one ``data.image_size`` square (1 untiled; native sizes differ: ``tiles_of``)."""
        if self.tiling is None:
            return 1
        if self.native:
            raise FrameworkError("data.image_size=native: the number of tiles differs by image (count them with tiles_of)")
        side = self.config["data"]["image_size"]
        return self.tiles_of(side, side)

    def tile_group(self) -> int:
        """Tiles the model must take together: every tile of an image, in tile order, when its fitted
        statistics differ by tile position (PaDiM's ``model.tile_ensemble``); else 1 (any tiles)."""
        if self.tiling is None or not getattr(self.model, "tile_ensemble", False):
            return 1
        return self.tiles_per_image()

    def tile_batches(self, batch: dict, backbone: bool = False) -> Iterator[dict]:
        """The batch's tiles as batches of at most ``data.batch_size`` tiles (a tiled ensemble:
        ``data.batch_size`` whole images' tiles), image by image: ``{"image" [n, 3, t, t] or "features"
        [n, ...] per stage, "tiles": True, "pairs": [(image, tile), ...]}``; ``backbone``: the backbone's
        batches of images, ``data.batch_size`` tiles. Untiled, or already tiles: the batch itself."""
        if self.tiling is None or batch.get("tiles"):
            yield batch
            return
        chunk = self.config["data"]["batch_size"] if backbone else self._chunk()
        if not backbone and self.tile_group() > 1 and "features" not in batch:
            batch = {"features": self.extract(self.images(batch))}  # whole images per call: the backbone's batches first
        if "features" in batch:  # per stage [B, T, ...], or (native) a list of [T_i, ...]
            counts = [len(tiles) for tiles in batch["features"][0]]
            # Every tile of the batch as one row per stage (a view for [B, T, ...]), gathered a chunk at a time.
            stages = [stage.flatten(0, 1) if isinstance(stage, torch.Tensor) else torch.cat(stage)
                      for stage in batch["features"]]
            first = [0, *accumulate(counts)]  # each image's first row
            for pairs in tile_chunks(counts, chunk):
                if len(pairs) == len(stages[0]):  # the whole batch in one chunk (a tiled ensemble's): no gather
                    yield {"features": stages, "tiles": True, "pairs": pairs}
                    continue
                rows = torch.tensor([first[image] + tile for image, tile in pairs], device=stages[0].device)
                yield {"features": [stage.index_select(0, rows) for stage in stages], "tiles": True, "pairs": pairs}
            return
        images = batch["image"]
        origins = [tile_origins(*image.shape[-2:], *self.tiling) for image in images]
        views = [cut(image, grid, self.tiling[0]) for image, grid in zip(images, origins)]  # views: a chunk is the only copy
        for pairs in tile_chunks([len(grid) for grid in origins], chunk):
            yield {"image": torch.stack([views[image][index] for image, index in pairs]), "tiles": True, "pairs": pairs}

    def all_tiles(self, batch: dict) -> dict:
        """Every tile of the batch in one batch (a gradient step on all of them)."""
        parts = list(self.tile_batches(batch))
        if len(parts) == 1:
            return parts[0]
        key = "features" if "features" in batch else "image"
        joined = ([torch.cat(stage) for stage in zip(*(part[key] for part in parts))] if key == "features"
                  else torch.cat([part[key] for part in parts]))
        return {key: joined, "tiles": True, "pairs": [pair for part in parts for pair in part["pairs"]]}

    def extract(self, images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The frozen backbone's features (``model.extract``); tiled, each image's tiles' features stacked
        [B, T, C, h, w] per stage (native: every tile of the batch [ΣT, C, h, w], image by image), the
        tiles going through the backbone a batch at a time."""
        if self.tiling is None:
            return self.model.extract(images)
        parts = [self.model.extract(self.images(part)) for part in self.tile_batches({"image": images}, backbone=True)]
        stages = [torch.cat(stage) for stage in zip(*parts)]
        if self.native:
            return stages
        count = len(tile_origins(*images.shape[-2:], *self.tiling))
        return [stage.reshape(len(images), count, *stage.shape[1:]) for stage in stages]

    def image_shapes(self, batch: dict) -> list[tuple[int, int]]:
        """(H, W) of each image of the batch; of cached features: the configured square, or (native) the
        masks' shapes, which are their images' own."""
        if "image" in batch:
            return [tuple(image.shape[-2:]) for image in batch["image"]]
        if not self.native:
            side = self.config["data"]["image_size"]
            return [(side, side)] * len(batch["features"][0])
        if "mask" not in batch:
            raise FrameworkError("data.image_size=native: a batch of cached features needs its masks (their images' sizes)")
        return [tuple(mask.shape[-2:]) for mask in batch["mask"]]

    def first_tiles(self, held_out: torch.Tensor, tiles: int) -> torch.Tensor:
        """Fit positions of the first tile of the fit images at ``held_out`` (``tiles`` per square image)."""
        if not self.native:
            return held_out * tiles
        if self.fit_tile_offsets is None:
            raise FrameworkError("data.image_size=native: leave-one-tile-out needs the fit's tile offsets "
                                 "(fit_tile_offsets, set by the memory trainer's fit)")
        return self.fit_tile_offsets[held_out]

    def evaluate_tiled(self, batch: dict, held_out: torch.Tensor | None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Maps of every tile stitched into one map per image [B, 1, H, W] (native: a list of [1, H, W]),
        overlaps averaged, and its maximum.

        ``held_out`` [B]: the fit's image positions; each tile is scored by ``model.leave_one_out`` at its
        own position in the fit (the image's first tile + tile, the order the fit saw them in)."""
        size, stride = self.tiling
        shapes = self.image_shapes(batch)
        origins = [tile_origins(height, width, size, stride) for height, width in shapes]
        if self.native:
            totals = [torch.zeros(1, 1, *shape, device=self.device) for shape in shapes]
        else:
            total = torch.zeros(len(shapes), 1, *shapes[0], device=self.device)
            totals = [total[image:image + 1] for image in range(len(shapes))]  # views of the batch's one array
        first = None if held_out is None else self.first_tiles(held_out, len(origins[0]))
        for part in self.tile_batches(batch):
            if first is None:
                outputs = self.forward(part)
            else:
                positions = torch.tensor([int(first[image]) + tile for image, tile in part["pairs"]])
                with self.timer("features"):
                    outputs = self.model.leave_one_out(self.inputs(part), positions)
            with self.timer("maps"):
                maps = self.maps_from_outputs(outputs, part).float()
                for tile_map, (image, tile) in zip(maps, part["pairs"]):
                    add_tiles(totals[image], [tile_map], [(0, tile)], origins[image])
        weights = {}
        for stitched, shape in zip(totals, shapes):  # in place: the stitched sum stays the only full-size array
            if shape not in weights:
                weights[shape] = [torch.from_numpy(axis).to(self.device) for axis in overlap_weights(*shape, size, stride)]
            rows, cols = weights[shape]
            stitched.mul_(rows).mul_(cols)
        if self.native:
            return {"anomaly_maps": [stitched[0] for stitched in totals],
                    "anomaly_scores": torch.stack([stitched.amax() for stitched in totals])}
        return {"anomaly_maps": total, "anomaly_scores": total.amax(dim=(1, 2, 3))}
