"""MVTec AD (Bergmann et al., CVPR 2019), and any custom data in its folder layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<good | defect type>/*.png
<root>/<category>/ground_truth/<defect type>/<stem>_mask.png   (optional as a whole folder)
"""
from __future__ import annotations

from pathlib import Path

from anomaly_framework.dataloaders.dataloader_base import BaseDataloader, Sample
from anomaly_framework.images.decode import list_images
from anomaly_framework.registry import DATALOADER_REGISTRY
from anomaly_framework.errors import FrameworkError

MVTEC_LAYOUT = "<root>/<category>/{train/good, test/<good|defect>, ground_truth/<defect>/<stem>_mask.png}"


def mvtec_samples(category_dir: Path, normal: str = "good", mask_suffix: str = "_mask") -> tuple[list, list]:
    """Train and test samples of one category folder in the MVTec layout.

    Without a ``ground_truth`` folder every mask is None (image metrics only); with one, each
    anomalous image must have its mask, so a single missing file is reported rather than scored as normal.
    """
    train_dir, test_dir, truth_dir = category_dir / "train" / normal, category_dir / "test", category_dir / "ground_truth"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise FrameworkError(f"Category folder '{category_dir}' lacks train/{normal} or test: expected {MVTEC_LAYOUT}")
    train = [Sample(path, 0, normal) for path in list_images(train_dir)]
    if not train:
        raise FrameworkError(f"No images in '{train_dir}' (empty split)")
    test = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = list_images(type_dir)
        if not images:
            raise FrameworkError(f"No images in '{type_dir}' (empty split)")
        label = int(type_dir.name != normal)
        for path in images:
            mask = None
            if label and truth_dir.is_dir():
                mask = next((candidate for candidate in _mask_candidates(truth_dir / type_dir.name, path.stem, mask_suffix)
                             if candidate.is_file()), None)
                if mask is None:
                    raise FrameworkError(
                        f"Mask for '{path}' missing: expected '{truth_dir / type_dir.name / (path.stem + mask_suffix + '.png')}'"
                    )
            test.append(Sample(path, label, type_dir.name, mask))
    return train, test


def _mask_candidates(folder: Path, stem: str, suffix: str) -> list[Path]:
    return [folder / f"{stem}{suffix}{ext}" for ext in (".png", ".bmp", ".PNG", ".BMP")]


@DATALOADER_REGISTRY.register("mvtec")
class MVTecDataloader(BaseDataloader):
    """MVTec AD or any folder in its layout (``--dataset mvtec --data-root <root> --category <name>``)."""

    env_var = "MVTEC_ROOT"
    layout = MVTEC_LAYOUT
    known_categories = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                        "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        category_dir = self.root / str(self.category)
        if not category_dir.is_dir():
            known = sorted(p.name for p in self.root.iterdir() if (p / "train").is_dir())
            raise FrameworkError(f"Unknown category '{self.category}': '{category_dir}' not found (categories here: {known})")
        return mvtec_samples(category_dir)
