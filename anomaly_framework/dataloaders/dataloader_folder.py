"""Any folders of images: data that is not in a benchmark's layout (``--dataset folder``).

    data.train_dir           normal training images
    data.test_normal_dir     normal test images
    data.test_abnormal_dir   anomalous test images (sub-folders, if any, name their defect types)
    data.mask_dir            optional: one mask per anomalous test image, same relative path and stem,
                             any image extension (``crack/004.png`` for ``crack/004.jpg``)
    data.valid_dir           optional labelled validation set: ``normal/`` and ``abnormal/`` sub-folders
                             (the threshold of ``eval.threshold_strategy=f1_adaptive``)

Relative paths are taken under ``data.root`` when it is set. Without ``data.mask_dir`` only image
metrics are computed. Every folder and every mask is checked here, before any model is built.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, BaseDataloader, Sample
from anomaly_framework.images.decode import IMAGE_SUFFIXES, is_image_file
from anomaly_framework.registry import DATALOADER_REGISTRY
from anomaly_framework.errors import FrameworkError

FOLDER_KEYS = ("train_dir", "test_normal_dir", "test_abnormal_dir", "mask_dir", "valid_dir")
FOLDER_LAYOUT = ("data.train_dir, data.test_normal_dir, data.test_abnormal_dir (folders of images), "
                 "optional data.mask_dir and data.valid_dir (normal/ and abnormal/)")
NORMAL, ANOMALOUS = "good", "anomalous"


def images_under(folder: Path) -> list[Path]:
    """Every image below ``folder`` (any depth), sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def defect_type(path: Path, folder: Path) -> str:
    """The first sub-folder below the anomalous folder names the defect type; images directly in it are
    of type ``anomalous``."""
    parts = path.relative_to(folder).parts
    return parts[0] if len(parts) > 1 else ANOMALOUS


def image_size(path: Path) -> tuple[int, int]:
    """Width × height from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise FrameworkError(f"Cannot read image '{path}': {error} (replace or remove the file)") from error


def match_masks(images: list[Path], image_dir: Path, mask_dir: Path) -> dict[Path, Path]:
    """Each anomalous image's mask, matched by relative path without extension; refuses a mask without
    an image, two masks for one image, an image without a mask and a mask of another size."""
    masks: dict[Path, Path] = {}
    for mask in images_under(mask_dir):
        key = mask.relative_to(mask_dir).with_suffix("")
        if key in masks:
            raise FrameworkError(f"Masks '{masks[key]}' and '{mask}' both match the stem '{key}' (keep one)")
        masks[key] = mask
    by_key: dict[Path, Path] = {}
    for path in images:
        key = path.relative_to(image_dir).with_suffix("")
        if key in by_key:
            raise FrameworkError(f"Images '{by_key[key]}' and '{path}' share the stem '{key}': masks could not tell "
                                 "them apart (rename one)")
        by_key[key] = path
    orphans = sorted(set(masks) - set(by_key))
    if orphans:
        raise FrameworkError(f"Mask '{masks[orphans[0]]}' has no image '{image_dir / orphans[0]}.*' in data.test_abnormal_dir "
                             f"({len(orphans)} such masks; masks are matched by relative path and stem)")
    missing = sorted(set(by_key) - set(masks))
    if missing:
        raise FrameworkError(f"Image '{by_key[missing[0]]}' has no mask '{mask_dir / missing[0]}.*' in data.mask_dir "
                             f"({len(missing)} without masks; give every anomalous image a mask, or no data.mask_dir)")
    for key, path in by_key.items():
        image_wh, mask_wh = image_size(path), image_size(masks[key])
        if image_wh != mask_wh:
            raise FrameworkError(f"Mask '{masks[key]}' is {mask_wh[0]}x{mask_wh[1]} but image '{path}' is "
                                 f"{image_wh[0]}x{image_wh[1]}: masks must have their image's size")
    return {by_key[key]: masks[key] for key in by_key}


@DATALOADER_REGISTRY.register("folder")
class FolderDataloader(BaseDataloader):
    """Normal training images, normal and anomalous test images, optional masks and labelled validation
    images, each from a folder of its own (``--train-dir``, ``--test-normal-dir``, ...)."""

    layout = FOLDER_LAYOUT

    @classmethod
    def all_categories(cls, data_cfg: dict) -> list[str]:
        """One set of folders is one category (``data.category`` names it in the run folder)."""
        return [data_cfg["category"]]

    def __init__(self, data_cfg: dict, seed: int) -> None:
        super().__init__(data_cfg, seed)
        if self.valid_samples:
            if data_cfg["labelled_val_fraction"] > 0:
                raise FrameworkError("data.valid_dir and data.labelled_val_fraction both define a labelled "
                                     "validation set: set only one")
            self.labelled_valid_dataset = AnomalyDataset(self.valid_samples, data_cfg)

    def resolve_root(self) -> Path:
        """``data.root`` when set (relative folders are taken under it), else the working directory."""
        root = Path(self.cfg["root"]).expanduser() if self.cfg["root"] else Path.cwd()
        if not root.is_dir():
            raise FrameworkError(f"data.root '{root}' not found (the folder dataset's paths are relative to it)")
        return root

    def folder(self, key: str, required: bool = True) -> Path | None:
        """The folder of ``data.<key>``, checked to exist and to hold images."""
        value = self.cfg[key]
        if value is None:
            if required:
                raise FrameworkError(f"--dataset folder needs data.{key} (--{key.replace('_', '-')} PATH): {FOLDER_LAYOUT}")
            return None
        path = self.root / Path(value).expanduser()
        if not path.is_dir():
            raise FrameworkError(f"data.{key} '{path}' is not a folder")
        if not images_under(path):
            raise FrameworkError(f"data.{key} '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)}): empty folder")
        return path

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        train_dir, normal_dir, abnormal_dir = (self.folder(key) for key in FOLDER_KEYS[:3])
        mask_dir, valid_dir = self.folder("mask_dir", required=False), self.folder("valid_dir", required=False)
        train = [Sample(path, 0, NORMAL) for path in images_under(train_dir)]
        abnormal = images_under(abnormal_dir)
        masks = match_masks(abnormal, abnormal_dir, mask_dir) if mask_dir else {}
        test = [Sample(path, 0, NORMAL) for path in images_under(normal_dir)]
        test += [Sample(path, 1, defect_type(path, abnormal_dir), masks.get(path)) for path in abnormal]
        # The MVTec reader's order (defect-type folders sorted, "good" among them), so the same images
        # give the same batches and the same numbers in either layout.
        test.sort(key=lambda sample: sample.defect_type)
        self.valid_samples = self.labelled_samples(valid_dir) if valid_dir else []
        return train, test

    @staticmethod
    def labelled_samples(valid_dir: Path) -> list[Sample]:
        """The labelled validation images: ``normal/`` and ``abnormal/`` under ``data.valid_dir``."""
        samples = []
        for name, label in (("normal", 0), ("abnormal", 1)):
            folder = valid_dir / name
            images = images_under(folder) if folder.is_dir() else []
            if not images:
                raise FrameworkError(f"data.valid_dir '{valid_dir}' needs images in '{folder}' (a labelled validation "
                                     "set has normal/ and abnormal/ sub-folders)")
            samples += [Sample(path, label, NORMAL if label == 0 else defect_type(path, folder)) for path in images]
        return samples
