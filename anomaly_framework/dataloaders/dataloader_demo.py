"""A built-in synthetic dataset in the MVTec layout, generated deterministically on first use.

It lets the framework run on a fresh machine with no download: textured surfaces (``fabric``,
``tiles``) and a simple object (``disc``), with scratches, holes, stains and missing parts drawn
together with their exact masks. Normal images vary (phase, shift, shading, noise) so the task is
not trivial. Each category is written to a temporary folder and renamed, so a half-written cache
is never read, and a version marker regenerates it when the generator changes. A folder of that name
without the marker is the user's: it is never replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from anomaly_framework.dataloaders.dataloader_base import BaseDataloader, Sample
from anomaly_framework.dataloaders.dataloader_mvtec import MVTEC_LAYOUT, mvtec_samples
from anomaly_framework.dataloaders.image_cache import default_cache_root
from anomaly_framework.registry import DATALOADER_REGISTRY
from anomaly_framework.errors import FrameworkError

DEMO_VERSION = "1"
DEMO_SIZE = 256
DEMO_CATEGORIES = {
    "fabric": ("scratch", "hole", "stain"),
    "tiles": ("crack", "hole", "stain"),
    "disc": ("scratch", "hole", "missing"),
}
TRAIN_IMAGES, TEST_GOOD, TEST_PER_DEFECT = 40, 10, 6


def _fabric(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:DEMO_SIZE, 0:DEMO_SIZE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(x * 0.55 + phase[0]) * np.sin(y * 0.55 + phase[1])
    base = np.array([0.45, 0.35, 0.55], np.float32) + rng.normal(0, 0.02, 3)
    image = base + 0.12 * weave[..., None] + rng.normal(0, 0.03, (DEMO_SIZE, DEMO_SIZE, 1))
    return np.clip(image, 0, 1)


def _tiles(rng: np.random.Generator) -> np.ndarray:
    period, offset = 32, rng.integers(0, 32, 2)
    y, x = np.mgrid[0:DEMO_SIZE, 0:DEMO_SIZE]
    grout = ((x + offset[0]) % period < 3) | ((y + offset[1]) % period < 3)
    shade = rng.normal(0, 0.03, (DEMO_SIZE // period + 2, DEMO_SIZE // period + 2))
    tile_shade = shade[(y + offset[1]) // period, (x + offset[0]) // period]
    image = np.full((DEMO_SIZE, DEMO_SIZE, 3), 0.75, np.float32) + tile_shade[..., None]
    image[grout] = (0.35, 0.35, 0.38)
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)


def _disc(rng: np.random.Generator) -> np.ndarray:
    image = np.full((DEMO_SIZE, DEMO_SIZE, 3), 0.15, np.float32) + rng.normal(0, 0.01, 3)
    centre = (DEMO_SIZE // 2 + int(rng.integers(-4, 5)), DEMO_SIZE // 2 + int(rng.integers(-4, 5)))
    y, x = np.mgrid[0:DEMO_SIZE, 0:DEMO_SIZE]
    radius = np.hypot(x - centre[0], y - centre[1])
    inside = radius < 90
    shading = 0.65 + 0.15 * np.cos(radius / 90 * np.pi / 2) + rng.normal(0, 0.02)
    image[inside] = (np.array([0.8, 0.7, 0.3], np.float32) * shading[inside, None])
    ring = (radius > 55) & (radius < 60)
    image[ring] *= 0.7
    return np.clip(image + rng.normal(0, 0.015, image.shape), 0, 1)


_SURFACES = {"fabric": _fabric, "tiles": _tiles, "disc": _disc}


def _draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws one defect; returns the image and its exact uint8 mask (255 = defect)."""
    mask = np.zeros((DEMO_SIZE, DEMO_SIZE), np.uint8)
    centre = rng.integers(70, DEMO_SIZE - 70, 2)
    if kind in ("scratch", "crack"):
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(30, 60)
        start = (centre - length * np.array([np.cos(angle), np.sin(angle)])).astype(int)
        end = (centre + length * np.array([np.cos(angle), np.sin(angle)])).astype(int)
        cv2.line(mask, tuple(map(int, start)), tuple(map(int, end)), 255, thickness=int(rng.integers(3, 6)))
        colour = (0.95, 0.95, 0.9) if kind == "scratch" else (0.1, 0.08, 0.08)
    elif kind == "hole":
        axes = tuple(int(v) for v in rng.integers(8, 18, 2))
        cv2.ellipse(mask, tuple(map(int, centre)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        colour = (0.02, 0.02, 0.02)
    elif kind == "stain":
        for _ in range(3):
            offset = centre + rng.integers(-10, 11, 2)
            cv2.circle(mask, tuple(map(int, offset)), int(rng.integers(8, 16)), 255, -1)
        colour = (0.55, 0.3, 0.1)
    elif kind == "missing":
        angle = rng.uniform(0, 360)
        cv2.ellipse(mask, (DEMO_SIZE // 2, DEMO_SIZE // 2), (92, 92), angle, 0, 35, 255, -1)
        cv2.ellipse(mask, (DEMO_SIZE // 2, DEMO_SIZE // 2), (40, 40), angle, 0, 35, 0, -1)
        colour = (0.15, 0.15, 0.15)
    else:
        raise ValueError(kind)
    defect = mask > 0
    image = image.copy()
    image[defect] = np.asarray(colour, np.float32) + rng.normal(0, 0.02, (int(defect.sum()), 3))
    return np.clip(image, 0, 1), mask


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor((array * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(path), array)


def generate_category(folder: Path, category: str, seed: int = 0) -> None:
    """Writes one category in the MVTec layout under ``folder / category``."""
    rng = np.random.default_rng([seed, sorted(DEMO_CATEGORIES).index(category)])
    surface, root = _SURFACES[category], folder / category
    for index in range(TRAIN_IMAGES):
        _write(root / "train" / "good" / f"{index:03d}.png", surface(rng))
    for index in range(TEST_GOOD):
        _write(root / "test" / "good" / f"{index:03d}.png", surface(rng))
    for kind in DEMO_CATEGORIES[category]:
        for index in range(TEST_PER_DEFECT):
            image, mask = _draw_defect(surface(rng), kind, rng)
            _write(root / "test" / kind / f"{index:03d}.png", image)
            _write(root / "ground_truth" / kind / f"{index:03d}_mask.png", mask)


def ensure_demo(root: Path, category: str) -> Path:
    """Generates ``root / category`` unless a complete copy of this generator version is there."""
    target = root / category
    marker = target / ".demo_version"
    if marker.is_file() and marker.read_text() == DEMO_VERSION:
        return target
    if target.exists() and not marker.is_file():
        raise FrameworkError(f"'{target}' exists but was not made by the demo generator (no {marker.name} marker): "
                             f"refusing to replace it; use another --data-root for the demo data")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=root))
    try:
        generate_category(staging, category)
        (staging / category / ".demo_version").write_text(DEMO_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / category, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@DATALOADER_REGISTRY.register("demo")
class DemoDataloader(BaseDataloader):
    """The generated demo dataset, read with the MVTec reader."""

    env_var = "ANOMALY_DEMO_ROOT"
    layout = MVTEC_LAYOUT
    known_categories = tuple(DEMO_CATEGORIES)

    @classmethod
    def all_categories(cls, data_cfg: dict) -> list[str]:
        """Every demo category: they are generated on first use."""
        return list(cls.known_categories)

    def resolve_root(self) -> Path:
        if self.category not in DEMO_CATEGORIES:
            raise FrameworkError(f"Unknown demo category '{self.category}': known are {', '.join(DEMO_CATEGORIES)}")
        root = Path(self.cfg["root"] or os.environ.get(self.env_var) or default_cache_root() / "demo").expanduser()
        ensure_demo(root, self.category)
        return root

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        return mvtec_samples(self.root / self.category)
