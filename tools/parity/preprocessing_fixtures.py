"""The preprocessing part of the end-to-end fixtures (tests/fixtures/parity/e2e_preprocessing.npz): each
official code's own dataset class (or, for STFPM, whose transform is built inline in its main script,
the same torchvision composition) on two fixed PNG files, 320 × 320, in an MVTec layout. Used by
make_end_to_end_fixtures.py (``--only preprocessing``).

Stored per model: the transformed tensors on a subsampled grid (every 3rd pixel) and their float64 sum
and sum of squares over every pixel, so that the whole tensor is pinned without storing it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from parity_inputs import parity_images

SIZE, COUNT, SEED, STEP = 320, 2, 9, 3


def write_pngs(folder: Path) -> list[Path]:
    """The fixed images as PNG files 000.png, 001.png (lossless, so every decoder reads the same pixels)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(parity_images(COUNT, SIZE, seed=SEED)):
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def summary(name: str, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """What the fixture keeps of a model's transformed images [N, 3, H, W]."""
    stacked = torch.stack([torch.as_tensor(np.asarray(t)) for t in tensors]).double()
    return {f"{name}_grid": stacked[:, :, ::STEP, ::STEP].float().numpy(),
            f"{name}_sum": stacked.sum().numpy(), f"{name}_sum_squares": stacked.square().sum().numpy(),
            f"{name}_shape": np.array(stacked.shape)}


def mvtec_pngs(root: Path, split: str = "train") -> Path:
    """The fixed PNG files in an MVTec layout under ``root`` (class ``bottle``, ``split``/good); returns root."""
    write_pngs(root / "bottle" / split / "good")
    return root


def coarse_summary(tensors: list[torch.Tensor], step: int = 3 * STEP) -> dict[str, np.ndarray]:
    """``summary`` under ``preprocessing_*`` keys with every ``step``-th pixel (small fixtures)."""
    arrays = summary("preprocessing", tensors)
    arrays["preprocessing_grid"] = arrays["preprocessing_grid"][:, :, ::step // STEP, ::step // STEP]
    return arrays


def official_preprocessing(checkouts: dict[str, Path]) -> dict[str, np.ndarray]:
    """Runs each official dataset's transform on the PNG files; returns the fixture arrays."""
    import PIL.Image
    import torchvision.transforms as T

    from make_fixtures import _import

    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_pngs(root / "bottle" / "train" / "good")
        # PaDiM: datasets/mvtec.py (Resize 256 with Image.ANTIALIAS, which Pillow >= 10 names LANCZOS).
        PIL.Image.ANTIALIAS = PIL.Image.LANCZOS
        padim = _import(checkouts["padim"] / "datasets" / "mvtec.py", "padim_official_mvtec")
        dataset = padim.MVTecDataset(str(root), "bottle", is_train=True, resize=256, cropsize=224)
        arrays.update(summary("padim", [dataset[i][0] for i in range(COUNT)]))
        # PatchCore: patchcore.datasets.mvtec.MVTecDataset (Resize 256, CenterCrop 224).
        sys.path.insert(0, str(checkouts["patchcore"] / "src"))
        from patchcore.datasets.mvtec import DatasetSplit, MVTecDataset

        dataset = MVTecDataset(str(root), "bottle", resize=256, imagesize=224, split=DatasetSplit.TRAIN)
        arrays.update(summary("patchcore", [dataset[i]["image"] for i in range(COUNT)]))
        # STFPM: main.MVTecDataset with main's inline transform (Resize [256, 256], ToTensor, Normalize).
        stfpm = _import(checkouts["stfpm"] / "main.py", "stfpm_official_main_pre")
        transform = T.Compose([T.Resize([256, 256]), T.ToTensor(),
                               T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
        dataset = stfpm.MVTecDataset([str(p) for p in paths], transform=transform)
        arrays.update(summary("stfpm", [dataset[i][1] for i in range(COUNT)]))
        # FastFlow: dataset.MVTecDataset (Resize input_size 256; its glob order is sorted here).
        fastflow = _import(checkouts["fastflow"] / "dataset.py", "fastflow_official_dataset")
        dataset = fastflow.MVTecDataset(str(root), "bottle", 256, is_train=True)
        dataset.image_files = sorted(dataset.image_files)
        arrays.update(summary("fastflow", [dataset[i] for i in range(COUNT)]))
        # DRAEM: data_loader.MVTecDRAEMTestDataset (cv2.imread BGR, cv2.resize 256, / 255).
        draem = _import(checkouts["draem"] / "data_loader.py", "draem_official_data_loader")
        dataset = draem.MVTecDRAEMTestDataset(str(root / "bottle" / "train"), resize_shape=[256, 256])
        arrays.update(summary("draem", [dataset[i]["image"] for i in range(COUNT)]))
    return arrays
