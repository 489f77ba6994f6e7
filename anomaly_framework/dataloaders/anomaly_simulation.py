"""DRAEM's anomaly simulation: Perlin-noise masks filled with an augmented foreign texture.

Zavrtanik, Kristan, Skočaj, "DRÆM – A discriminatively trained reconstruction embedding for surface
anomaly detection", ICCV 2021. The recipe implemented is the official code's (VitjanZ/DRAEM,
``data_loader.py`` and ``perlin.py``), rewritten with numpy, OpenCV and PIL instead of imgaug:
- mask: Perlin noise at 2^a × 2^b lattice cells (a, b ∈ {0..5}), rotated by U(−90°, 90°) with zero
  fill, thresholded at 0.5;
- texture: an image of the texture set (DTD layout) resized to the input size, then 3 distinct of the
  code's 10 imgaug operations in random order;
- blend: β ~ U[0, 0.8) weights the *original* pixel, so the texture's opacity is in (0.2, 1];
  half of the samples get no anomaly (empty mask, has_anomaly 0);
- the normal image itself is rotated by U(−90°, 90°) with probability 0.3 (the code's ``rand > 0.7``).

Where the paper and the code differ, the code is followed (REFERENCE P7): the paper rotates by ±45°
and gives the anomaly opacity as [0.1, 1].

Where this module differs from the official code:
- randomness: each item draws from ``np.random.default_rng([seed, epoch, index])`` instead of the
  global torch / imgaug generators, so a seed fixes every sample whatever the number of workers; and
  item ``index`` is used as given, where the code ignores it and draws a random training image.
- images and textures are RGB; the code feeds BGR arrays (cv2.imread) to imgaug's RGB colour
  operations, which only permutes which hue a shift lands on.
- the normal image is rotated as float in [0, 1], the code rotates the uint8 image first (rounding).
- Perlin noise for a size not divisible by the lattice resolution (the code asserts nothing and
  breaks) is evaluated on whole cells of ceil(size / resolution) pixels and cropped.
- without a texture set (the paper always uses DTD), Perlin noise serves as the texture, as in
  anomalib (see ``perlin_texture``), with a warning that numbers will be lower.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset

from anomaly_framework.dataloaders.dataloader_base import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset
from anomaly_framework.images.decode import is_image_file, open_image
from anomaly_framework.errors import FrameworkError

DTD_LAYOUT = ("<texture_root>/images/<class>/*.jpg (the Describable Textures Dataset: its folder dtd/, the folder "
              "holding dtd/, or dtd/images) or any folder of images")


def texture_files(root: Path) -> list[Path]:
    """The texture images under ``root``. DTD as distributed (the tarball unpacks to ``dtd/images/<class>/*.jpg``
    beside ``labels/`` and ``imdb/``) is recognised from any of its three levels and read as the official
    DRAEM code reads it, ``images/*/*.jpg``; any other folder gives every image found recursively."""
    for images in (root, root / "images", root / "dtd" / "images"):
        if images.name == "images" and images.is_dir():
            found = sorted(p for p in images.glob("*/*.jpg") if p.is_file())
            if found:
                return found
    return sorted(p for p in root.rglob("*") if is_image_file(p))
_LEVELS = np.arange(256, dtype=np.float32)


def perlin_noise_2d(shape: tuple[int, int], resolution: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise float32 [H, W] in [−1, 1] with ``resolution`` lattice cells per axis.

    Cells span ceil(size / resolution) pixels: the noise of a padded, divisible size cropped to
    ``shape``; for divisible sizes this is the official ``rand_perlin_2d_np``.
    """
    (height, width), (cells_y, cells_x) = shape, resolution
    angles = rng.random((cells_y + 1, cells_x + 1)) * (2 * math.pi)
    grad_y, grad_x = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    # Work on [cell row, pixel in cell, cell column, pixel in cell]: every pixel of a cell shares its
    # four corner gradients, so broadcasting replaces a per-pixel gather.
    size_y, size_x = -(-height // cells_y), -(-width // cells_x)
    fy = (np.arange(size_y, dtype=np.float32) / size_y)[None, :, None, None]
    fx = (np.arange(size_x, dtype=np.float32) / size_x)[None, None, None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of each cell's (dy, dx) corner gradient with the offset from that corner."""
        cells = (slice(dy, dy + cells_y), slice(dx, dx + cells_x))
        return grad_y[cells][:, None, :, None] * (fy - dy) + grad_x[cells][:, None, :, None] * (fx - dx)

    fade_y, fade_x = (t * t * t * (t * (t * 6 - 15) + 10) for t in (fy, fx))
    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    left, right = n00 + fade_y * (n10 - n00), n01 + fade_y * (n11 - n01)
    # sqrt(2) rescales the theoretical range of 2D Perlin noise, ±sqrt(1/2), to ±1 (as the code does).
    noise = math.sqrt(2) * (left + fade_x * (right - left))
    return noise.reshape(cells_y * size_y, cells_x * size_x)[:height, :width]


def rotate(array: np.ndarray, degrees: float) -> np.ndarray:
    """Bilinear rotation about the centre; uncovered corners are 0, as with imgaug's Affine defaults."""
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(np.ascontiguousarray(array), matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def perlin_mask(size: int | tuple[int, int], rng: np.random.Generator, min_scale: int = 0, max_scale: int = 6,
                threshold: float = 0.5) -> np.ndarray:
    """Binary float32 mask [H, W]: Perlin noise at 2^a × 2^b cells (a, b ∈ [min_scale, max_scale)),
    rotated by U(−90°, 90°), above ``threshold``. Blob sizes thus range from the whole image to a few pixels."""
    scale_y, scale_x = 2 ** rng.integers(min_scale, max_scale, size=2)
    noise = perlin_noise_2d(_square(size), (int(scale_y), int(scale_x)), rng)
    return (rotate(noise, rng.uniform(-90, 90)) > threshold).astype(np.float32)


# The code's ten imgaug texture operations, on uint8 RGB [H, W, 3]; imgaug's defaults where the code
# gives no arguments. Most are 256-entry lookup tables, which is what imgaug does for uint8 as well.
def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Applies a [256] or per-channel [256, 3] table."""
    table = np.clip(np.round(table), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table.reshape(1, 256, -1))


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """GammaContrast((0.5, 2.0), per_channel=True)."""
    return _lut(image, 255 * (_LEVELS[:, None] / 255) ** rng.uniform(0.5, 2.0, size=3))


_BRIGHTNESS_SPACES = ((cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0), (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
                      (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1), (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
                      (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0), (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0))


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): the brightness channel of a random
    one of imgaug's six colour spaces, multiply and add in random order."""
    to_space, from_space, channel = _BRIGHTNESS_SPACES[rng.integers(len(_BRIGHTNESS_SPACES))]
    mul, add = rng.uniform(0.8, 1.2), int(rng.integers(-30, 31))
    table = np.repeat(_LEVELS[:, None], 3, axis=1)
    if rng.random() < 0.5:
        table[:, channel] = np.clip(np.round(_LEVELS * mul), 0, 255) + add
    else:
        table[:, channel] = np.clip(_LEVELS + add, 0, 255) * mul
    return cv2.cvtColor(_lut(cv2.cvtColor(image, to_space), table), from_space)


def _sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """pillike.EnhanceSharpness() with its default factor U(0, 2): 0 blurs, 1 keeps, 2 sharpens."""
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """AddToHueAndSaturation((-50, 50), per_channel=True): independent integer shifts; the hue one is in
    imgaug's 0..255 units, projected onto OpenCV's 0..179 hue circle."""
    hue, saturation = rng.integers(-50, 51, size=2)
    table = np.stack([(_LEVELS + int(hue / 255 * 180)) % 180, _LEVELS + saturation, _LEVELS], axis=1)
    return cv2.cvtColor(_lut(cv2.cvtColor(image, cv2.COLOR_RGB2HSV), table), cv2.COLOR_HSV2RGB)


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Solarize(0.5, threshold=(32, 128)): with probability 0.5, invert the values >= U[32, 128)."""
    if rng.random() >= 0.5:
        return image
    return _lut(image, np.where(_LEVELS >= rng.uniform(32, 128), 255 - _LEVELS, _LEVELS))


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Posterize() with its default nb_bits {1..8}: keep the top bits (as PIL's posterize)."""
    keep = 0xFF & ~(2 ** (8 - int(rng.integers(1, 9))) - 1)
    return _lut(image, (_LEVELS.astype(np.int32) & keep).astype(np.float32))


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Invert() (p=1)."""
    return 255 - image


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """pillike.Autocontrast() with its default cutoff, an integer percentage in {0..20}."""
    return np.asarray(ImageOps.autocontrast(Image.fromarray(image), cutoff=int(rng.integers(0, 21))))


def _equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """pillike.Equalize()."""
    return np.asarray(ImageOps.equalize(Image.fromarray(image)))


def _affine_rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Affine(rotate=(-45, 45)), bilinear, zero fill."""
    return rotate(image, rng.uniform(-45, 45))


TEXTURE_AUGMENTATIONS = (_gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize, _invert,
                         _autocontrast, _equalize, _affine_rotate)


def augment_texture(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3 distinct operations out of the code's 10, in random order, on a uint8 [H, W, 3] texture."""
    for index in rng.choice(len(TEXTURE_AUGMENTATIONS), size=3, replace=False):
        texture = TEXTURE_AUGMENTATIONS[index](texture, rng)
    return np.ascontiguousarray(texture)


def perlin_texture(size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A grey uint8 texture [H, W, 3]: Perlin noise at a random 2^a × 2^b scale, ×0.5 + 0.25, clipped.

    The fallback when no texture set is given: anomalib's recipe, except that anomalib reuses the
    mask's own noise while this draws fresh noise, so the texture stays independent of the mask as a
    DTD image is. The random colour operations of ``augment_texture`` then vary it.
    """
    scale_y, scale_x = (int(s) for s in 2 ** rng.integers(0, 6, size=2))
    grey = np.clip(perlin_noise_2d(_square(size), (scale_y, scale_x), rng) * 0.5 + 0.25, 0, 1)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)


class TextureSource:
    """Where anomaly textures come from: a texture set (DTD layout) or, when None, Perlin textures.

    Args:
        texture_root: DTD as distributed (see ``texture_files``), any folder of images (taken
            recursively), or None for the Perlin fallback, which warns that numbers will be lower.
        image_size: side of the square textures, the model's input size.
        warn: whether the fallback warns.
    """

    def __init__(self, texture_root: str | Path | None, image_size: int, warn: bool = True) -> None:
        self.image_size = image_size
        self.paths: list[Path] = []
        if texture_root is None:
            if warn:
                warnings.warn("No texture set (train.texture_root): DRAEM's anomalies use Perlin-noise textures "
                              "instead of DTD, so expect lower numbers than the paper's (its flat-colour ablation: "
                              "96.2 image AUROC vs 98.0 with DTD). Download DTD and set train.texture_root.")
            return
        root = Path(texture_root).expanduser()
        if not root.is_dir():
            raise FrameworkError(f"Texture folder '{root}' not found: expected {DTD_LAYOUT} (set train.texture_root)")
        self.paths = texture_files(root)
        if not self.paths:
            raise FrameworkError(f"No images under texture folder '{root}': expected {DTD_LAYOUT}")

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A random, augmented texture: float32 [S, S, 3] in [0, 1]."""
        size = self.image_size
        if self.paths:
            path = self.paths[int(rng.integers(len(self.paths)))]
            texture = cv2.resize(np.asarray(open_image(path, "RGB")), (size, size), interpolation=cv2.INTER_LINEAR)
        else:
            texture = perlin_texture(size, rng)
        return augment_texture(texture, rng).astype(np.float32) / 255


def simulate_anomaly(image: np.ndarray, texture: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Pastes ``texture`` into ``image`` (both float32 [H, W, 3] in [0, 1]) under a random Perlin mask.

    With probability 0.5 the image is returned unchanged with an empty mask. Otherwise, with
    β ~ U[0, 0.8): image·(1−m) + (1−β)·texture·m + β·image·m.

    Returns:
        The image [H, W, 3], the mask float32 [H, W, 1] in {0, 1}, and has_anomaly (0 for an empty mask).
    """
    if rng.random() < 0.5:
        return image.astype(np.float32, copy=True), np.zeros((*image.shape[:2], 1), np.float32), 0.0
    mask = perlin_mask(image.shape[:2], rng)[..., None]
    return paste_texture(image, texture, mask, rng), mask, float(mask.any())


def paste_texture(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """image·(1−m) + (1−β)·texture·m + β·image·m with β ~ U[0, 0.8): the texture's opacity is in (0.2, 1]."""
    beta = rng.uniform(0.0, 0.8)
    return (image * (1 - mask) + ((1 - beta) * texture + beta * image) * mask).astype(np.float32)


class DraemTrainingDataset(Dataset):
    """A training split with simulated anomalies: what DRAEM's two networks train on.

    Args:
        base: the split, loaded with ``data.normalize='none'`` so images are in [0, 1] like the textures.
        textures: the anomaly source; its size must be the images' size.
        seed: with the epoch (``set_epoch``) and the index, fixes every item.

    Items: ``image`` (the normal image, possibly rotated) and ``augmented_image`` float [3, H, W] in
    [0, 1], ``anomaly_mask`` float [1, H, W] in {0, 1}, ``has_anomaly`` float [1], ``label`` long 0,
    ``image_path`` str.
    """

    def __init__(self, base: AnomalyDataset, textures: TextureSource, seed: int = 0) -> None:
        if getattr(base, "normalize", None) != "none":
            raise FrameworkError(f"DRAEM's anomaly simulation needs images in [0, 1] like its textures, but the dataset "
                                 f"uses normalize={getattr(base, 'normalize', None)!r}: set data.normalize=none (P2)")
        if textures.image_size != base.image_size:
            raise FrameworkError(f"Textures are {textures.image_size} px but images are {base.image_size} px: "
                                 f"build the TextureSource with data.image_size")
        self.base, self.textures, self.seed, self.epoch = base, textures, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """New anomalies every epoch, still reproducible from the seed; call before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = self.base[index]
        image = item["image"].permute(1, 2, 0).numpy()
        if rng.random() > 0.7:
            image = rotate(image, rng.uniform(-90, 90))
        augmented, mask, has_anomaly = simulate_anomaly(image, self.textures.sample(rng), rng)

        def chw(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))

        return {
            "image": chw(image),
            "augmented_image": chw(augmented),
            "anomaly_mask": chw(mask),
            "has_anomaly": torch.tensor([has_anomaly], dtype=torch.float32),
            "label": torch.tensor(0, dtype=torch.long),
            "image_path": item["image_path"],
        }


class SimulatedDefectSet(Dataset):
    """Held-out normal images, each with ``copies`` fixed simulated defects (never an empty mask).

    A label-free stand-in for real defects when choosing the epoch to keep (``train.monitor =
    synthetic_pixel_auroc``): the test set is never looked at. Items: ``image`` normalised as ``base``
    normalises, ``mask`` float [1, H, W] in {0, 1}, ``label`` 1, ``image_path``, ``defect_type`` "simulated".
    """

    def __init__(self, base: AnomalyDataset, textures: TextureSource, seed: int = 0, copies: int = 2) -> None:
        self.base, self.textures, self.seed, self.copies = base, textures, seed, copies
        self.imagenet = getattr(base, "normalize", None) == "imagenet"

    def __len__(self) -> int:
        return len(self.base) * self.copies

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        item = self.base[index // self.copies]
        image = item["image"] * IMAGENET_STD + IMAGENET_MEAN if self.imagenet else item["image"]
        image = image.permute(1, 2, 0).numpy()
        mask = np.zeros((*image.shape[:2], 1), np.float32)
        while not mask.any():
            mask = perlin_mask(image.shape[:2], rng)[..., None]
        augmented = torch.from_numpy(paste_texture(image, self.textures.sample(rng), mask, rng)).permute(2, 0, 1)
        if self.imagenet:
            augmented = (augmented - IMAGENET_MEAN) / IMAGENET_STD
        return {"image": augmented.contiguous(), "mask": torch.from_numpy(mask).permute(2, 0, 1).contiguous(),
                "label": torch.tensor(1, dtype=torch.long), "image_path": item["image_path"], "defect_type": "simulated"}
