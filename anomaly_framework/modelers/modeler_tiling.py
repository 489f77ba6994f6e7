"""Tiled inference and training for every model with a feature backbone (``data.tile_size``, ``data.tile_stride``).

The image is read at ``data.image_size``; the model only ever sees ``tile_size`` squares. Tiles are cut
on the grid of ``images.tiling`` and go through the model ``data.batch_size`` at a time (the backbone's
batches); their maps, computed by the model's own hooks at the tile size, are added into one full-size
sum per image and averaged where tiles overlap. The image score is the maximum of that stitched map, for
every model (a tile's own image score, e.g. PatchCore's re-weighted one, sees only its tile).

Training: a batch of B images becomes the B·T tiles of its images (a memory model collects them a chunk
at a time; a gradient model takes one step on all of them), so one statistic set is shared by all tile
positions (PaDiM: one Gaussian per position within the tile, fitted on every tile). Cached backbone
features of an image are its tiles' features, stacked [T, C, h, w] per stage. The fit's own images are
scored leave-one-tile-out: each tile as if its own features had been left out of the fit.
"""
from __future__ import annotations

from typing import Iterator

import torch

from anomaly_framework.images.tiling import add_tiles, cut, overlap_weights, tile_chunks, tile_origins, tiles_per_image


class TilingMixin:
    """Cuts, streams and stitches tiles for ``BaseModeler`` (needs ``config``, ``model``, ``device``,
    ``timer``, ``forward``, ``images`` and ``maps_from_outputs``). Untiled, every method is the identity."""

    # The export traces the model on one tile and leaves the tiling to its runner.
    tiling_enabled = True

    @property
    def tiling(self) -> tuple[int, int] | None:
        """(tile size, stride) when the config tiles, else None."""
        data = (self.config or {}).get("data", {})
        size = data.get("tile_size")
        if size is None or not self.tiling_enabled:
            return None
        return size, data.get("tile_stride") or size

    def tiles_per_image(self) -> int:
        """Tiles of one ``data.image_size`` square (1 untiled)."""
        if self.tiling is None:
            return 1
        side = self.config["data"]["image_size"]
        return tiles_per_image(side, side, *self.tiling)

    def _chunk(self) -> int:
        return self.config["data"]["batch_size"]

    def tile_batches(self, batch: dict) -> Iterator[dict]:
        """The batch's tiles as batches of at most ``data.batch_size`` tiles, image by image: ``{"image"
        [n, 3, t, t] or "features" [n, ...] per stage, "tiles": True, "pairs": [(image, tile), ...]}``.
        Untiled, or already tiles: the batch itself."""
        if self.tiling is None or batch.get("tiles"):
            yield batch
            return
        if "features" in batch:
            stages = batch["features"]
            for pairs in tile_chunks(len(stages[0]), stages[0].shape[1], self._chunk()):
                images, tiles = (torch.tensor(column) for column in zip(*pairs))
                yield {"features": [stage[images, tiles] for stage in stages], "tiles": True, "pairs": pairs}
            return
        images = batch["image"]
        origins = tile_origins(*images.shape[-2:], *self.tiling)
        views = [cut(image, origins, self.tiling[0]) for image in images]  # views: a chunk is the only copy
        for pairs in tile_chunks(len(images), len(origins), self._chunk()):
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

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's features (``model.extract``); tiled, each image's tiles' features stacked
        [B, T, C, h, w] per stage, the tiles going through the backbone a batch at a time."""
        if self.tiling is None:
            return self.model.extract(images)
        parts = [self.model.extract(self.images(part)) for part in self.tile_batches({"image": images})]
        count = len(tile_origins(*images.shape[-2:], *self.tiling))
        return [torch.cat(stage).reshape(len(images), count, *stage[0].shape[1:]) for stage in zip(*parts)]

    def evaluate_tiled(self, batch: dict, held_out: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Maps of every tile stitched into one map per image [B, 1, H, W] (overlaps averaged) and its maximum.

        ``held_out`` [B]: the fit's image positions; each tile is scored by ``model.leave_one_out`` at its
        own position in the fit (image · T + tile, the order the fit saw them in)."""
        size, stride = self.tiling
        if "features" in batch:
            num, height = len(batch["features"][0]), self.config["data"]["image_size"]
            width = height
        else:
            num, (height, width) = len(batch["image"]), batch["image"].shape[-2:]
        origins = tile_origins(height, width, size, stride)
        total = torch.zeros(num, 1, height, width, device=self.device)
        for part in self.tile_batches(batch):
            if held_out is None:
                outputs = self.forward(part)
            else:
                positions = torch.tensor([int(held_out[image]) * len(origins) + tile for image, tile in part["pairs"]])
                with self.timer("features"):
                    outputs = self.model.leave_one_out(self.inputs(part), positions)
            with self.timer("maps"):
                add_tiles(total, self.maps_from_outputs(outputs, part).float(), part["pairs"], origins)
        rows, cols = (torch.from_numpy(weights).to(self.device) for weights in overlap_weights(height, width, size, stride))
        total.mul_(rows).mul_(cols)  # in place: the stitched sum stays the only full-size array
        return {"anomaly_maps": total, "anomaly_scores": total.amax(dim=(1, 2, 3))}
