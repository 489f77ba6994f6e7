"""DRAEM's anomaly simulation: Perlin noise and masks, the blend, texture sources, the training dataset."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.dataloaders.anomaly_simulation import (TEXTURE_AUGMENTATIONS, DraemTrainingDataset, SimulatedDefectSet,
                                            TextureSource,
                                            augment_texture, perlin_mask, perlin_noise_2d, perlin_texture,
                                            simulate_anomaly)
from anomaly_framework.dataloaders.dataloader_base import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, Sample
from anomaly_framework.errors import FrameworkError

SIZE = 64


def _rng(seed=0):
    return np.random.default_rng(seed)


def _roughness(noise):
    return np.abs(np.diff(noise, axis=0)).mean() + np.abs(np.diff(noise, axis=1)).mean()


def test_perlin_noise_range_lattice_zeros_and_resolution():
    noise = perlin_noise_2d((128, 128), (4, 4), _rng())
    assert noise.shape == (128, 128) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1 + 1e-5 and noise.std() > 0.1
    assert np.allclose(noise[::32, ::32], 0, atol=1e-6)  # gradient noise vanishes on the lattice
    coarse, fine = (np.mean([_roughness(perlin_noise_2d((128, 128), (r, r), _rng(s))) for s in range(4)])
                    for r in (2, 32))
    assert fine > 4 * coarse


def test_perlin_noise_accepts_sizes_not_divisible_by_the_resolution():
    noise = perlin_noise_2d((100, 70), (32, 3), _rng())
    assert noise.shape == (100, 70) and np.isfinite(noise).all() and np.abs(noise).max() <= 1 + 1e-5


def test_perlin_masks_are_binary_and_vary():
    masks = [perlin_mask(SIZE, _rng(seed)) for seed in range(20)]
    for mask in masks:
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
    coverage = [mask.mean() for mask in masks]
    assert 0 < np.mean(coverage) < 0.5 and len(set(coverage)) > 10


@pytest.mark.parametrize("operation", TEXTURE_AUGMENTATIONS, ids=lambda op: op.__name__)
def test_texture_operations_keep_uint8_rgb(operation):
    texture = _rng().integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = operation(texture, _rng(1))
    assert out.shape == texture.shape and out.dtype == np.uint8


def test_augment_texture_and_perlin_texture():
    texture = perlin_texture(SIZE, _rng())
    assert texture.shape == (SIZE, SIZE, 3) and texture.dtype == np.uint8 and texture.std() > 5
    assert (texture == texture[..., :1]).all() and texture.max() <= 192  # grey, noise·0.5 + 0.25
    assert augment_texture(texture, _rng(1)).shape == (SIZE, SIZE, 3)


def _blend_inputs(seed=0):
    rng = _rng(seed)
    image = rng.uniform(0.0, 0.4, (SIZE, SIZE, 3)).astype(np.float32)
    texture = rng.uniform(0.6, 1.0, (SIZE, SIZE, 3)).astype(np.float32)  # differs from the image everywhere
    return image, texture


def test_blend_changes_the_image_exactly_inside_the_mask_with_one_beta():
    image, texture = _blend_inputs()
    blended = 0
    for seed in range(40):
        augmented, mask, has_anomaly = simulate_anomaly(image, texture, _rng(seed))
        assert augmented.shape == image.shape and augmented.dtype == np.float32
        assert mask.shape == (SIZE, SIZE, 1) and set(np.unique(mask)) <= {0.0, 1.0}
        assert has_anomaly == float(mask.any())
        inside = mask[..., 0] > 0
        assert np.array_equal(augmented[~inside], image[~inside])
        if not inside.any():
            continue
        blended += 1
        assert (np.abs(augmented - image)[inside] > 0).all()
        # Inside: β·image + (1−β)·texture with a single β ∈ [0, 0.8) weighting the original pixel.
        beta = (augmented - texture)[inside] / (image - texture)[inside]
        assert np.allclose(beta, beta.mean(), atol=1e-4) and 0 <= beta.mean() < 0.8
    assert blended > 5


def test_half_of_the_draws_have_no_anomaly():
    image, texture = _blend_inputs()
    rng = _rng(123)
    empty = [not simulate_anomaly(image, texture, rng)[1].any() for _ in range(400)]
    assert abs(np.mean(empty) - 0.5) < 0.08


def _write_images(folder, count, size, suffix=".png", seed=0):
    rng = _rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_texture_source_reads_a_dtd_layout(tmp_path):
    for name in ("banded", "dotted"):
        _write_images(tmp_path / "dtd" / "images" / name, 2, 48, ".jpg")
    (tmp_path / "dtd" / "labels").mkdir()
    (tmp_path / "dtd" / "labels" / "train1.txt").write_text("banded/000.jpg\n")
    source = TextureSource(str(tmp_path / "dtd"), SIZE)
    assert len(source) == 4
    texture = source.sample(_rng())
    assert texture.shape == (SIZE, SIZE, 3) and texture.dtype == np.float32
    assert 0 <= texture.min() and texture.max() <= 1


def test_texture_source_errors_name_the_folder(tmp_path):
    with pytest.raises(FrameworkError, match="missing_dtd.*images/<class>"):
        TextureSource(str(tmp_path / "missing_dtd"), SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FrameworkError, match="empty"):
        TextureSource(str(tmp_path / "empty"), SIZE)


def test_texture_source_without_a_folder_warns_and_uses_perlin_textures():
    with pytest.warns(UserWarning, match="DTD"):
        source = TextureSource(None, SIZE)
    texture = source.sample(_rng())
    assert texture.shape == (SIZE, SIZE, 3) and 0 <= texture.min() and texture.max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextureSource(None, SIZE, warn=False)


def _dataset(tmp_path, normalize="none"):
    paths = _write_images(tmp_path / "train" / "good", 4, 80)
    data_cfg = {"image_size": SIZE, "crop_ratio": 1.0, "interpolation": "bilinear", "normalize": normalize,
                "cache": False}
    return AnomalyDataset([Sample(path, 0, "good") for path in paths], data_cfg)


def test_training_dataset_items_follow_the_contract(tmp_path):
    dataset = DraemTrainingDataset(_dataset(tmp_path), TextureSource(None, SIZE, warn=False), seed=0)
    assert len(dataset) == 4
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    for key in ("image", "augmented_image"):
        assert batch[key].shape == (4, 3, SIZE, SIZE) and batch[key].dtype == torch.float32
        assert 0 <= batch[key].min() and batch[key].max() <= 1
    assert batch["anomaly_mask"].shape == (4, 1, SIZE, SIZE) and batch["anomaly_mask"].dtype == torch.float32
    assert set(batch["anomaly_mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["has_anomaly"].shape == (4, 1) and batch["has_anomaly"].dtype == torch.float32
    assert torch.equal(batch["has_anomaly"][:, 0], batch["anomaly_mask"].flatten(1).amax(1))
    assert batch["label"].tolist() == [0, 0, 0, 0] and batch["label"].dtype == torch.long
    assert batch["image_path"][0].endswith("000.png")
    outside = batch["anomaly_mask"].expand(-1, 3, -1, -1) == 0
    assert torch.equal(batch["augmented_image"][outside], batch["image"][outside])


def test_training_dataset_is_deterministic_per_seed_epoch_and_index(tmp_path):
    base, textures = _dataset(tmp_path), TextureSource(None, SIZE, warn=False)
    first, second = DraemTrainingDataset(base, textures, seed=7), DraemTrainingDataset(base, textures, seed=7)

    def same(a, b):
        return all(torch.equal(a[key], b[key]) for key in ("image", "augmented_image", "anomaly_mask"))

    assert all(same(first[i], second[i]) for i in range(len(base)))
    second.set_epoch(1)
    assert not all(same(first[i], second[i]) for i in range(len(base)))
    first.set_epoch(1)
    assert same(first[2], second[2])


def test_training_dataset_refuses_normalised_images(tmp_path):
    with pytest.raises(FrameworkError, match="normalize"):
        DraemTrainingDataset(_dataset(tmp_path, normalize="imagenet"), TextureSource(None, SIZE, warn=False))
    with pytest.raises(FrameworkError, match="Textures are 32 px"):
        DraemTrainingDataset(_dataset(tmp_path), TextureSource(None, 32, warn=False))


@pytest.mark.parametrize("normalize", ["imagenet", "none"])
def test_simulated_defect_set_has_fixed_non_empty_defects_in_the_base_normalisation(tmp_path, normalize):
    base = _dataset(tmp_path, normalize=normalize)
    defects = SimulatedDefectSet(base, TextureSource(None, SIZE, warn=False), seed=3, copies=2)
    again = SimulatedDefectSet(base, TextureSource(None, SIZE, warn=False), seed=3, copies=2)
    assert len(defects) == 8
    for index in range(len(defects)):
        item = defects[index]
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].sum() > 0 and item["label"] == 1
        assert torch.equal(item["image"], again[index]["image"])  # the same defects every epoch
        original = base[index // 2]["image"]
        outside = item["mask"].expand(3, -1, -1) == 0
        assert torch.allclose(item["image"][outside], original[outside], atol=1e-5)
        assert not torch.allclose(item["image"][~outside], original[~outside], atol=1e-3)
        pixels = item["image"] * IMAGENET_STD + IMAGENET_MEAN if normalize == "imagenet" else item["image"]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert not torch.equal(defects[0]["mask"], defects[1]["mask"])  # two different copies of one image
