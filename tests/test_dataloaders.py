"""Each dataset reader on generated trees in its real layout, the protocol, splits, and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.dataloaders.dataloader_btad import BTADDataloader
from anomaly_framework.dataloaders.dataloader_demo import DEMO_CATEGORIES, ensure_demo
from anomaly_framework.dataloaders.dataloader_mvtec import MVTecDataloader
from anomaly_framework.dataloaders.dataloader_visa import VisADataloader
from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _image(rng, size=40, gray=False):
    shape = (size, size) if gray else (size, size, 3)
    return rng.integers(0, 255, shape, dtype=np.uint8)


def _mask(size=40, value=255):
    mask = np.zeros((size, size), np.uint8)
    mask[10:20, 10:20] = value
    return mask


def _data_cfg(name, root, **extra):
    config = resolve_config({"data.name": name, "data.root": str(root), "data.image_size": 32,
                             "data.crop_ratio": 1.0, "data.batch_size": 4, **extra})
    return config["data"]


def make_mvtec(root, category="widget", gray=False, with_truth=True):
    rng = np.random.default_rng(0)
    base = root / category
    for i in range(6):
        _save(base / "train" / "good" / f"{i:03d}.png", _image(rng, gray=gray))
    for i in range(2):
        _save(base / "test" / "good" / f"{i:03d}.png", _image(rng, gray=gray))
        _save(base / "test" / "crack" / f"{i:03d}.png", _image(rng, gray=gray))
        if with_truth:
            _save(base / "ground_truth" / "crack" / f"{i:03d}_mask.png", _mask())
    return root


def test_mvtec_batches_follow_the_contract(tmp_path):
    loader = MVTecDataloader(_data_cfg("mvtec", make_mvtec(tmp_path, gray=True), **{"data.category": "widget"}), seed=0)
    batch = next(iter(loader.test_loader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["label"].tolist() == [1, 1, 0, 0]  # folders sorted: crack, good
    assert batch["defect_type"] == ["crack", "crack", "good", "good"]
    assert batch["image_path"][0].endswith("000.png")
    assert loader.has_masks and len(loader.train_dataset) == 6


def test_resize_and_centre_crop_move_the_mask_where_expected(tmp_path):
    make_mvtec(tmp_path)
    cfg = _data_cfg("mvtec", tmp_path, **{"data.category": "widget", "data.image_size": 20, "data.crop_ratio": 0.5})
    loader = MVTecDataloader(cfg, seed=0)
    mask = loader.test_dataset[0]["mask"][0]
    # 40 px → resize 40 → centre crop 20 keeps pixels 10..29; the defect square 10..19 lands at 0..9.
    expected = torch.zeros(20, 20)
    expected[0:10, 0:10] = 1
    assert torch.equal(mask, expected)


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    make_mvtec(tmp_path)
    cfg = _data_cfg("mvtec", tmp_path, **{"data.category": "widget", "data.val_fraction": 0.34})
    first, second = MVTecDataloader(cfg, seed=1), MVTecDataloader(cfg, seed=1)
    train = {s.path for s in first.train_dataset.samples}
    valid = {s.path for s in first.valid_dataset.samples}
    assert len(valid) == 2 and not train & valid and len(train | valid) == 6
    assert valid == {s.path for s in second.valid_dataset.samples}
    assert next(iter(first.valid_loader()))["label"].sum() == 0


def test_cache_returns_the_same_tensors(tmp_path):
    make_mvtec(tmp_path)
    plain = MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget", "data.cache": False}), seed=0)
    cached = MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget",
                                                             "data.cache_dir": str(tmp_path / "cache")}), seed=0)
    for index in range(3):  # the first read fills the cache, the second reads it back
        for _ in range(2):
            for key in ("image", "mask"):
                assert torch.equal(plain.test_dataset[index][key], cached.test_dataset[index][key])
    assert list((tmp_path / "cache" / "images").rglob("*.npy"))


def test_category_without_ground_truth_is_accepted_with_a_warning(tmp_path):
    make_mvtec(tmp_path, with_truth=False)
    with pytest.warns(UserWarning, match="pixel metrics are unavailable"):
        loader = MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget"}), seed=0)
    assert not loader.has_masks and loader.test_dataset[0]["mask"].sum() == 0


def test_visa_reads_the_1cls_csv_and_binarises_class_masks(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["object,split,label,image,mask"]
    for i in range(4):
        path = f"candle/Data/Images/Normal/{i:03d}.JPG"
        _save(tmp_path / path, _image(rng), fmt="JPEG")
        rows.append(f"candle,{'train' if i < 3 else 'test'},normal,{path},")
    for i in range(2):
        path, mask = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        _save(tmp_path / path, _image(rng), fmt="JPEG")
        _save(tmp_path / mask, _mask(value=3))  # class index 3, not 255
        rows.append(f"candle,test,anomaly,{path},{mask}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    loader = VisADataloader(_data_cfg("visa", tmp_path, **{"data.category": "candle"}), seed=0)
    assert len(loader.train_dataset) == 3 and len(loader.test_dataset) == 3
    anomalous = [item for item in loader.test_dataset if item["label"] == 1]
    assert len(anomalous) == 2 and all(item["mask"].max() == 1 for item in anomalous)
    with pytest.raises(FrameworkError, match="Unknown VisA category 'pcb9'.*candle"):
        VisADataloader(_data_cfg("visa", tmp_path, **{"data.category": "pcb9"}), seed=0)


def test_btad_mixed_bmp_png_and_ok_ko_folders(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "03"
    for i in range(3):
        _save(base / "train" / "ok" / f"{i:04d}.bmp", _image(rng), fmt="BMP")
    _save(base / "test" / "ok" / "0000.bmp", _image(rng), fmt="BMP")
    _save(base / "test" / "ko" / "0000.bmp", _image(rng), fmt="BMP")
    _save(base / "ground_truth" / "ko" / "0000.bmp", _mask(), fmt="BMP")
    _save(base / "test" / "ko" / "0001.png", _image(rng))
    _save(base / "ground_truth" / "ko" / "0001.png", _mask())
    loader = BTADDataloader(_data_cfg("btad", tmp_path, **{"data.category": "03"}), seed=0)
    labels = [item["label"].item() for item in loader.test_dataset]
    assert labels == [1, 1, 0]
    assert all(item["mask"].max() == 1 for item in loader.test_dataset if item["label"] == 1)


def test_demo_is_deterministic(tmp_path):
    first = ensure_demo(tmp_path / "a", "disc")
    second = ensure_demo(tmp_path / "b", "disc")
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files[:20])
    masks = list((first / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == 6 * len(DEMO_CATEGORIES["disc"])
    assert all(np.asarray(Image.open(m)).max() == 255 for m in masks)


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FrameworkError, match=r"nowhere.*<root>/<category>.*MVTEC_ROOT"):
        MVTecDataloader(_data_cfg("mvtec", tmp_path / "nowhere"), seed=0)


def test_unknown_category_lists_known_ones(tmp_path):
    make_mvtec(tmp_path)
    with pytest.raises(FrameworkError, match=r"Unknown category 'bottle'.*widget"):
        MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "bottle"}), seed=0)


def test_empty_split_names_the_folder(tmp_path):
    make_mvtec(tmp_path)
    for path in (tmp_path / "widget" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(FrameworkError, match=r"train/good.*empty"):
        MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget"}), seed=0)


def test_one_missing_mask_is_an_error_naming_it(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FrameworkError, match=r"001_mask\.png"):
        MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget"}), seed=0)


def test_corrupt_image_is_named(tmp_path):
    make_mvtec(tmp_path)
    broken = tmp_path / "widget" / "test" / "crack" / "000.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(FrameworkError, match=r"Cannot read image .*crack/000\.png"):  # found when the splits are listed
        MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget"}), seed=0)


def test_mask_of_another_size_is_an_error_naming_both(tmp_path):
    make_mvtec(tmp_path)
    _save(tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png", _mask(size=30))
    with pytest.raises(FrameworkError, match=r"000_mask\.png' is 30x30 but image .*000\.png' is 40x40"):
        MVTecDataloader(_data_cfg("mvtec", tmp_path, **{"data.category": "widget"}), seed=0)
