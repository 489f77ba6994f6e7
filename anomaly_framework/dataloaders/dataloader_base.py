"""What every dataset reader shares: samples, the resize/crop protocol, mask checks, splits and loaders.

A reader only lists its samples (path, label, defect type, mask path); loading, the paper's
preprocessing protocol, validation of every file and the train/valid/test loaders are written once here.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from anomaly_framework.dataloaders.image_cache import ArrayStore, cache_root, file_key
from anomaly_framework.errors import FrameworkError
from anomaly_framework.images.decode import header_size, open_image, open_mask
from anomaly_framework.images.geometry import crop_offset, interpolation_code, resize_and_crop
from anomaly_framework.images.tiling import check_holds_tile
from anomaly_framework.ops import normalize as ops_normalize

IMAGENET_MEAN = torch.tensor(ops_normalize.IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_STD = torch.tensor(ops_normalize.IMAGENET_STD).view(3, 1, 1)
# Part of every image-cache key: raise it when the decoding or the geometry below changes.
_CACHE_VERSION = 1
NATIVE = "native"  # data.image_size: each file at its own size, no resize, no crop (tiled runs)
# Item fields whose size is the image's own at data.image_size=native: batched as lists, not stacked.
RAGGED_FIELDS = ("image", "mask", "features")


@dataclass(frozen=True)
class Sample:
    """One image: its path, label (0 normal, 1 anomalous), defect type and mask path (None if none)."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


def mask_size_error(sample: Sample, mask_size: tuple[int, int], image_size: tuple[int, int]) -> FrameworkError:
    return FrameworkError(f"Mask '{sample.mask_path}' is {mask_size[0]}x{mask_size[1]} but image '{sample.path}' is "
                          f"{image_size[0]}x{image_size[1]}: masks must have their image's size")


def check_files(samples: list[Sample], native_tile: int | None = None) -> None:
    """Reads every image's and mask's header, so a broken file, a mask of the wrong size or (``native_tile``:
    native size) an image smaller than a tile stops the run before the fit, not after it."""
    for sample in samples:
        size = header_size(sample.path)
        check_holds_tile(sample.path, size, native_tile)
        if sample.mask_path is not None:
            mask_size = header_size(sample.mask_path)
            if mask_size != size:
                raise mask_size_error(sample, mask_size, size)


def auto_workers() -> int:
    """``data.num_workers=None``: no worker processes on 1-2 usable cores, where they only take turns with
    the model, else one per spare core up to 8 (decoding then overlaps the forward pass)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores - 1)


def collate_native(items: list[dict]) -> dict:
    """A batch of images of their own sizes: ``image``, ``mask`` (and cached ``features``, per stage) as
    lists of the items' tensors; the other fields as the default collation makes them."""
    batch = default_collate([{key: value for key, value in item.items() if key not in RAGGED_FIELDS} for item in items])
    for key in RAGGED_FIELDS:
        if key in items[0]:
            values = [item[key] for item in items]
            batch[key] = [list(stage) for stage in zip(*values)] if key == "features" else values
    return batch


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 [C, H, W] of a PIL image (C = 1 for greyscale)."""
    array = np.asarray(image)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)


class AnomalyDataset(Dataset):
    """Loads samples with the configured protocol: resize to image_size / crop_ratio, centre crop.

    Items are dicts: ``image`` float [3, H, W] (normalised per ``normalize``), ``label`` long,
    ``mask`` float [1, H, W] in {0, 1}, ``image_path`` str, ``defect_type`` str. With ``data.cache``
    each image and mask is decoded once per protocol and then read from the shared on-disk cache
    (``data.cache_dir``, see ``image_cache``), by every run and every DataLoader worker.
    """

    def __init__(self, samples: list[Sample], data_cfg: dict) -> None:
        self.samples = samples
        self.image_size = data_cfg["image_size"]
        self.crop_ratio = data_cfg["crop_ratio"]
        self.native = self.image_size == NATIVE
        self.tile_size = data_cfg.get("tile_size")
        self.resize = None if self.native else round(self.image_size / self.crop_ratio)
        self.interpolation = interpolation_code(data_cfg["interpolation"])
        if data_cfg["normalize"] not in ("imagenet", "none"):
            raise FrameworkError(f"data.normalize must be 'imagenet' or 'none', got {data_cfg['normalize']!r}")
        self.normalize = data_cfg["normalize"]
        self.protocol = (f"v{_CACHE_VERSION}|native" if self.native else
                         f"v{_CACHE_VERSION}|resize={self.resize}|{data_cfg['interpolation']}|crop={self.image_size}")
        self.store = ArrayStore(cache_root(data_cfg.get("cache_dir")) / "images") if data_cfg["cache"] else None

    def __len__(self) -> int:
        return len(self.samples)

    def _geometry(self, image: Image.Image, interpolation: int, size: int | None = None) -> torch.Tensor:
        """Resize to a square of side ``size / crop_ratio``, centre-crop ``size`` (default: the model input;
        native: the image as it is); uint8 [C, H, W]."""
        if size is None and self.native:
            return _to_tensor(image)
        size = size or self.image_size
        return _to_tensor(resize_and_crop(image, round(size / self.crop_ratio), size, interpolation))

    def _cached(self, path: Path, kind: str, make) -> torch.Tensor:
        """``make()``'s uint8 array, through the cache when it is on (a private copy of the mapped file)."""
        if self.store is None:
            return torch.from_numpy(make())
        return torch.from_numpy(np.array(self.store.get(file_key(path, kind, self.protocol), make)))

    def cache_key(self, index: int) -> str:
        """Identifies the model input of item ``index``: the image file, the protocol and the normalisation."""
        return file_key(self.samples[index].path, "rgb", self.protocol, self.normalize)

    def load_image(self, index: int) -> torch.Tensor:
        """Preprocessed uint8 image [3, H, W] of one sample."""
        path = self.samples[index].path
        image = self._cached(path, "rgb", lambda: self._geometry(open_image(path, "RGB"), self.interpolation).numpy())
        if self.native:
            check_holds_tile(path, (image.shape[2], image.shape[1]), self.tile_size)
        return image

    def input_shape(self, index: int) -> tuple[int, int]:
        """(H, W) of the model input of item ``index``: the configured square, or (native) the file's own
        upright size, from its header."""
        if not self.native:
            return self.image_size, self.image_size
        width, height = header_size(self.samples[index].path)
        return height, width

    def load_mask(self, index: int) -> torch.Tensor:
        """Binary uint8 mask [1, H, W] of one sample (zeros when it has none)."""
        sample = self.samples[index]
        if sample.mask_path is None:
            return torch.zeros(1, *self.input_shape(index), dtype=torch.uint8)
        # The image's key joins the mask's: the size check below must see the current image.
        kind = f"mask|{file_key(sample.path)}"
        return self._cached(sample.mask_path, kind, lambda: self._decode_mask(sample))

    def _decode_mask(self, sample: Sample) -> np.ndarray:
        mask = open_mask(sample.mask_path)
        size = header_size(sample.path)  # upright, from the header alone
        if mask.size != size:
            raise mask_size_error(sample, mask.size, size)
        return (self._geometry(mask, Image.NEAREST) > 0).numpy().astype(np.uint8)

    def native_crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The centre crop (left, top, right, bottom) in an original image's own pixels: what the model sees."""
        if self.native:
            return 0, 0, width, height
        offset = crop_offset(self.resize, self.image_size)
        left, right = round(offset * width / self.resize), round((offset + self.image_size) * width / self.resize)
        top, bottom = round(offset * height / self.resize), round((offset + self.image_size) * height / self.resize)
        return left, top, right, bottom

    def ground_truth(self, index: int, size: int | str) -> torch.Tensor:
        """Binary uint8 mask [1, h, w] of one sample read from its original file, at an evaluation resolution:
        ``size`` px square (resized by nearest neighbour and centre-cropped as the images), or ``"native"``
        (the crop region at the original image's own resolution, no resizing)."""
        sample = self.samples[index]
        if sample.mask_path is not None:
            mask = open_mask(sample.mask_path)
        else:
            mask = Image.new("L", header_size(sample.path), 0)
        if size == "native":
            return (_to_tensor(mask.crop(self.native_crop_box(*mask.size))) > 0).to(torch.uint8)
        return (self._geometry(mask, Image.NEAREST, size) > 0).to(torch.uint8)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed uint8 image [3, H, W] and binary uint8 mask [1, H, W] of one sample."""
        return self.load_image(index), self.load_mask(index)

    def targets(self, index: int) -> dict:
        """Everything of an item but the image: what a pass over cached backbone features still needs."""
        sample = self.samples[index]
        return {
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": self.load_mask(index).float(),
            "image_path": str(sample.path),
            "defect_type": sample.defect_type,
        }

    def __getitem__(self, index: int) -> dict:
        image = self.load_image(index).float().div_(255)
        if self.normalize == "imagenet":
            image = (image - IMAGENET_MEAN) / IMAGENET_STD
        return {"image": image, **self.targets(index)}


class BaseDataloader:
    """Train / held-out valid / test splits of one category, and their torch DataLoaders.

    Subclasses set ``env_var`` and ``layout`` (for error messages) and implement ``list_samples``.

    Args:
        data_cfg: the config's ``data`` section.
        seed: seeds the split of train/good into train and held-out validation images.
    """

    env_var = ""
    layout = ""
    known_categories: tuple[str, ...] = ()

    @classmethod
    def all_categories(cls, data_cfg: dict) -> list[str]:
        """The categories found under the data root (``--category all``): the official names present,
        else (custom data in the same layout) every sub-folder."""
        root = data_cfg["root"] or os.environ.get(cls.env_var)
        if not root or not Path(root).expanduser().is_dir():
            raise FrameworkError(f"Dataset root '{root}' not found: expected {cls.layout} (set data.root or {cls.env_var})")
        folders = sorted(p.name for p in Path(root).expanduser().iterdir() if p.is_dir())
        known = [name for name in cls.known_categories if name in folders]
        found = known or [name for name in folders if not name.startswith((".", "_")) and name != "split_csv"]
        if not found:
            raise FrameworkError(f"--category all found no category folder under '{root}': give the dataset's "
                                 f"root, whose sub-folders are its categories ({cls.layout})")
        return found

    def __init__(self, data_cfg: dict, seed: int) -> None:
        self.cfg = data_cfg
        self.category = data_cfg["category"]
        self.root = self.resolve_root()
        train, test = self.list_samples()
        if not train:
            raise FrameworkError(f"No training images for category '{self.category}' under '{self.root}' ({self.layout})")
        if not test:
            raise FrameworkError(f"No test images for category '{self.category}' under '{self.root}' ({self.layout})")
        check_files(train + test, data_cfg["tile_size"] if data_cfg["image_size"] == NATIVE else None)
        self.has_masks = any(sample.mask_path is not None for sample in test)
        if not self.has_masks:
            warnings.warn(f"Category '{self.category}' has no ground-truth masks: pixel metrics are unavailable")
        train, valid = self._split(train, data_cfg["val_fraction"], seed)
        labelled_valid, test = self._split_labelled(test, data_cfg["labelled_val_fraction"], seed)
        self.train_dataset = AnomalyDataset(train, data_cfg)
        self.valid_dataset = AnomalyDataset(valid, data_cfg) if valid else None
        self.labelled_valid_dataset = AnomalyDataset(labelled_valid, data_cfg) if labelled_valid else None
        self.test_dataset = AnomalyDataset(test, data_cfg)

    def resolve_root(self) -> Path:
        """``data.root``, else the dataset's environment variable; it must exist."""
        root = self.cfg["root"] or os.environ.get(self.env_var)
        if not root:
            raise FrameworkError(f"No data root: set data.root (--data-root) or {self.env_var}; expected {self.layout}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FrameworkError(f"Dataset root '{root}' not found: expected {self.layout} (set data.root or {self.env_var})")
        return root

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        """Train samples (normal only) and test samples of ``self.category``."""
        raise NotImplementedError

    @staticmethod
    def _split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
        """Deterministic held-out share of the normal training images (at least one when fraction > 0)."""
        if fraction <= 0:
            return samples, []
        count = max(1, round(len(samples) * fraction))
        if count >= len(samples):
            raise FrameworkError(f"data.val_fraction={fraction} leaves no training images out of {len(samples)}")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        held_out = set(order[:count])
        return ([s for i, s in enumerate(samples) if i not in held_out], [s for i, s in enumerate(samples) if i in held_out])

    @classmethod
    def _split_labelled(cls, test: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
        """A seeded share of each label of the test split as a labelled validation set, and the rest."""
        if fraction <= 0:
            return [], test
        held_out, kept = [], []
        for label in (0, 1):
            group = [sample for sample in test if sample.label == label]
            if group:
                rest, part = cls._split(group, fraction, seed + 1 + label) if len(group) > 1 else (group, [])
                held_out += part
                kept += rest
        if not kept:
            raise FrameworkError(f"data.labelled_val_fraction={fraction} leaves no test images")
        order = {sample.path: index for index, sample in enumerate(test)}
        return sorted(held_out, key=lambda s: order[s.path]), sorted(kept, key=lambda s: order[s.path])

    def make_loader(self, dataset: Dataset, shuffle: bool, drop_last: bool = False, sampler=None,
                    batch_size: int | None = None, num_workers: int | None = None) -> DataLoader:
        """A DataLoader over ``dataset`` (any split, or a wrapper of one) with the configured batch and workers
        (``num_workers=0`` for in-memory tensors, which worker processes would only copy). Batches are
        pinned when ``pin_memory`` is set (the trainer sets it on CUDA), so host-to-device copies overlap."""
        batch_size = batch_size or self.cfg["batch_size"]
        if num_workers is None:
            num_workers = self.cfg["num_workers"] if self.cfg["num_workers"] is not None else auto_workers()
        if drop_last and len(dataset) < batch_size:
            drop_last = False  # a tiny split still trains on its one partial batch
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, sampler=sampler,
                          num_workers=num_workers, persistent_workers=False,
                          collate_fn=collate_native if self.cfg["image_size"] == NATIVE else None,
                          pin_memory=getattr(self, "pin_memory", False) and not getattr(dataset, "on_device", False))

    def train_loader(self, shuffle: bool = True, drop_last: bool = False) -> DataLoader:
        return self.make_loader(self.train_dataset, shuffle, drop_last)

    def valid_loader(self) -> DataLoader | None:
        return self.make_loader(self.valid_dataset, False) if self.valid_dataset is not None else None

    def labelled_valid_loader(self) -> DataLoader | None:
        """The labelled validation share of the test split (``data.labelled_val_fraction``), or None."""
        dataset = self.labelled_valid_dataset
        return self.make_loader(dataset, False) if dataset is not None else None

    def test_loader(self) -> DataLoader:
        return self.make_loader(self.test_dataset, False)

    def info(self) -> dict:
        """What was found, for the console report."""
        test_types = Counter(sample.defect_type for sample in self.test_dataset.samples)
        return {
            "dataset": self.cfg["name"],
            "category": self.category,
            "root": str(self.root),
            "train / valid / test": f"{len(self.train_dataset)} / {len(self.valid_dataset or [])} / {len(self.test_dataset)}"
                                    + (f" (+{len(self.labelled_valid_dataset)} labelled valid from test)"
                                       if self.labelled_valid_dataset else ""),
            "test types": ", ".join(f"{name} {count}" for name, count in sorted(test_types.items())),
            "protocol": (f"native size (no resize, no crop), tiles {self.cfg['tile_size']}" if self.train_dataset.native else
                         f"resize {self.train_dataset.resize} ({self.cfg['interpolation']}) -> crop {self.cfg['image_size']}")
                        + f", normalize {self.cfg['normalize']}",
            "masks": "yes" if self.has_masks else "none (pixel metrics unavailable)",
        }
