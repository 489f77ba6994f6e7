"""Images and masks stored in any common PNG/JPEG form decode to the values they show (generated files)."""
import numpy as np
from PIL import Image

from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, Sample
from anomaly_framework.images.decode import open_image, open_mask

DATA_CFG = {"image_size": 8, "crop_ratio": 1.0, "interpolation": "bilinear", "normalize": "none", "cache": False}


def test_16_bit_grayscale_gradient_maps_to_its_8_bit_values(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 3).round().astype(np.uint16).reshape(3, 64)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    decoded = np.asarray(open_image(tmp_path / "g16.png", "RGB"))
    expected = np.rint(gradient / 257.0).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(decoded[..., channel], expected)


def test_palette_and_gray_alpha_images_decode_to_their_colours(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    palette_image = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette_image.save(tmp_path / "p.png")
    indices, palette = np.asarray(palette_image), np.asarray(palette_image.getpalette(), np.uint8).reshape(-1, 3)
    assert np.array_equal(np.asarray(open_image(tmp_path / "p.png", "RGB")), palette[indices])

    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "la.png", "RGB")), np.repeat(gray[..., None], 3, axis=2))


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100)
    expected = np.rot90(stored, k=-1)
    assert np.array_equal(np.asarray(open_image(tmp_path / "r.png", "RGB")), expected)
    assert np.asarray(open_image(tmp_path / "r.jpg", "RGB")).shape == expected.shape  # JPEG: lossy values
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :2] = 255
    Image.fromarray(mask).save(tmp_path / "m.png", exif=exif)
    assert np.array_equal(np.asarray(open_mask(tmp_path / "m.png")), np.rot90(mask, k=-1))


def test_masks_are_read_by_stored_value_not_colour(tmp_path):
    indices = np.zeros((8, 8), np.uint8)
    indices[2:4, 2:6] = 1
    indices[6, 6] = 2
    palette_mask = Image.fromarray(indices, "P")
    palette_mask.putpalette([255, 255, 255, 1, 0, 0, 0, 0, 0] + [0] * 759)  # background index 0 drawn white
    palette_mask.save(tmp_path / "p_mask.png")
    Image.fromarray(indices.astype(np.uint16)).save(tmp_path / "i16_mask.png")  # class ids 1, 2 in 16 bits
    for name in ("p_mask.png", "i16_mask.png"):
        assert np.array_equal(np.asarray(open_mask(tmp_path / name)), np.where(indices > 0, 255, 0)), name


def test_dataset_uses_the_same_decoding(tmp_path):
    """Training, test and predict all load through AnomalyDataset: a 16-bit image and palette mask there."""
    gradient = np.tile(np.linspace(0, 65535, 8).round().astype(np.uint16), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    indices = np.zeros((8, 8), np.uint8)
    indices[:, :3] = 1
    mask = Image.fromarray(indices, "P")
    mask.putpalette([255, 255, 255, 1, 0, 0] + [0] * 762)
    mask.save(tmp_path / "mask.png")
    dataset = AnomalyDataset([Sample(tmp_path / "g16.png", 1, "defect", tmp_path / "mask.png")], DATA_CFG)
    item = dataset[0]
    expected = np.rint(gradient / 257.0) / 255
    assert np.allclose(item["image"].numpy(), np.broadcast_to(expected, (3, 8, 8)), atol=1e-6)
    assert np.array_equal(item["mask"][0].numpy(), indices.astype(np.float32))
