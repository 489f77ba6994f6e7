"""The ``folder`` dataset: any folders of images, on a generated tree and on real bottle images rearranged
out of the MVTec layout (same images, same numbers as the MVTec reader)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.dataloaders.dataloader_folder import FolderDataloader
from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.errors import FrameworkError

BOTTLE = Path("/work/data/bottle")
TINY = {"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 32,
        "data.crop_ratio": 1.0, "data.batch_size": 4, "eval.num_figures": 0}


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _square_mask(size=40):
    mask = np.zeros((size, size), np.uint8)
    mask[10:20, 10:20] = 255
    return mask


def make_tree(root, masks=True):
    """train/ (6), test/ok (2), test/bad with a crack/ sub-folder and one image at its top; masks/ mirrors
    test/bad with other extensions (stems match)."""
    rng = np.random.default_rng(0)
    images = lambda: rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)  # noqa: E731
    for i in range(6):
        _save(root / "train" / f"n{i}.png", images())
    for i in range(2):
        _save(root / "test" / "ok" / f"ok{i}.jpg", images(), fmt="JPEG")
        _save(root / "test" / "bad" / "crack" / f"{i:03d}.png", images())
    _save(root / "test" / "bad" / "x.png", images())
    if masks:
        for stem in ("crack/000", "crack/001", "x"):
            _save(root / "masks" / f"{stem}.bmp", _square_mask(), fmt="BMP")
    return root


def _folder_cfg(root, **extra):
    keys = {"data.name": "folder", "data.root": str(root), "data.train_dir": "train", "data.test_normal_dir": "test/ok",
            "data.test_abnormal_dir": "test/bad", "data.mask_dir": "masks", **TINY, **extra}
    return resolve_config({key: value for key, value in keys.items() if value is not None})


def test_tree_with_masks_follows_the_batch_contract(tmp_path):
    loader = FolderDataloader(_folder_cfg(make_tree(tmp_path))["data"], seed=0)
    samples = loader.test_dataset.samples
    assert [s.defect_type for s in samples] == ["anomalous", "crack", "crack", "good", "good"]
    assert [s.label for s in samples] == [1, 1, 1, 0, 0]
    assert [s.mask_path.name if s.mask_path else None for s in samples] == ["x.bmp", "000.bmp", "001.bmp", None, None]
    assert loader.has_masks and len(loader.train_dataset) == 6
    expected = torch.zeros(1, 32, 32)
    expected[:, 8:16, 8:16] = 1  # the 10..19 square of a 40 px mask, nearest-resized to 32 px
    assert torch.equal(loader.test_dataset[1]["mask"], expected)
    assert loader.test_dataset[3]["mask"].sum() == 0


def test_without_masks_only_image_metrics(tmp_path):
    root = make_tree(tmp_path, masks=False)
    with pytest.warns(UserWarning, match="pixel metrics are unavailable"):
        results = run_experiment({**_folder_cfg(root, **{"data.mask_dir": None}), "output_dir": str(tmp_path / "runs")})
    assert results["metrics"]["pixel_auroc"] is None and results["metrics"]["image_auroc"] is not None


@pytest.mark.parametrize("breakage, message", [
    (lambda root: shutil.rmtree(root / "test" / "ok") or (root / "test" / "ok").mkdir(),
     r"data.test_normal_dir '.*test/ok' holds no images .*empty folder"),
    (lambda root: _save(root / "masks" / "y.png", _square_mask()),
     r"Mask '.*masks/y.png' has no image '.*test/bad/y\.\*' in data.test_abnormal_dir"),
    (lambda root: _save(root / "masks" / "crack" / "001.bmp", _square_mask(30), fmt="BMP"),
     r"Mask '.*crack/001.bmp' is 30x30 but image '.*crack/001.png' is 40x40"),
    (lambda root: (root / "masks" / "x.bmp").unlink(), r"Image '.*bad/x.png' has no mask '.*masks/x\.\*'"),
    (lambda root: shutil.rmtree(root / "train"), r"data.train_dir '.*train' is not a folder"),
])
def test_bad_trees_fail_with_one_line_naming_the_file(tmp_path, breakage, message):
    root = make_tree(tmp_path)
    breakage(root)
    with pytest.raises(FrameworkError, match=message) as error:
        FolderDataloader(_folder_cfg(root)["data"], seed=0)
    assert "\n" not in str(error.value)


def test_a_required_folder_missing_from_the_config_names_its_flag(tmp_path):
    with pytest.raises(FrameworkError, match="data.test_abnormal_dir \\(--test-abnormal-dir PATH\\)"):
        FolderDataloader(_folder_cfg(make_tree(tmp_path), **{"data.test_abnormal_dir": None})["data"], seed=0)


def test_the_cli_reports_a_bad_tree_in_one_line(tmp_path, capsys):
    root = make_tree(tmp_path)
    (root / "masks" / "x.bmp").unlink()
    code = main(["--data-root", str(root), "--train-dir", "train", "--test-normal-dir", "test/ok",
                 "--test-abnormal-dir", "test/bad", "--mask-dir", "masks", "--output-dir", str(tmp_path / "runs")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: Image '") and "has no mask" in error and "\n" not in error
    assert not (tmp_path / "runs").exists()  # refused before any run folder or model


def test_labelled_validation_folder_sets_the_f1_adaptive_threshold(tmp_path):
    root = make_tree(tmp_path)
    rng = np.random.default_rng(1)
    for name in ("normal", "abnormal"):
        for i in range(2):
            _save(root / "valid" / name / f"{i}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    config = _folder_cfg(root, **{"data.valid_dir": "valid"})
    loader = FolderDataloader(config["data"], seed=0)
    assert [s.label for s in loader.labelled_valid_dataset.samples] == [0, 0, 1, 1]
    assert len(loader.test_dataset) == 5  # the test split keeps every test image
    results = run_experiment({**config, "eval.threshold_strategy": "f1_adaptive", "output_dir": str(tmp_path / "runs")})
    assert results["metrics"]["threshold_source"].startswith("f1_adaptive on the labelled validation split (4 ")
    with pytest.raises(FrameworkError, match="set only one"):
        FolderDataloader(_folder_cfg(root, **{"data.valid_dir": "valid", "data.labelled_val_fraction": 0.3})["data"], 0)


def _copy(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def _as_mvtec(tree, target):
    """The generated tree copied into the MVTec layout (train/good, test/<type>, ground_truth/<type>/*_mask)."""
    base = target / "widget"
    for path in (tree / "train").iterdir():
        _copy(path, base / "train" / "good" / path.name)
    for path in (tree / "test" / "ok").iterdir():
        _copy(path, base / "test" / "good" / path.name)
    for path in (tree / "test" / "bad").rglob("*.png"):
        kind = path.parent.name if path.parent.name == "crack" else "anomalous"
        _copy(path, base / "test" / kind / path.name)
        mask = tree / "masks" / path.relative_to(tree / "test" / "bad").with_suffix(".bmp")
        _save(base / "ground_truth" / kind / f"{path.stem}_mask.png", np.asarray(Image.open(mask)))
    return target


def test_cli_flags_give_the_mvtec_readers_numbers_on_the_same_images(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    code = main(["--train-dir", str(tree / "train"), "--test-normal-dir", str(tree / "test" / "ok"),
                 "--test-abnormal-dir", str(tree / "test" / "bad"), "--mask-dir", str(tree / "masks"),
                 "--output-dir", str(tmp_path / "runs"), *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]])
    assert code == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_dir.parent.parent.name == "custom" and run_dir.parts[-4] == "folder"
    folder = json.loads((run_dir / "results.json").read_text())["metrics"]
    mvtec = run_experiment({**TINY, "data.name": "mvtec", "data.root": str(_as_mvtec(tree, tmp_path / "mvtec")),
                            "data.category": "widget", "output_dir": str(tmp_path / "runs")})["metrics"]
    assert {k: v for k, v in folder.items() if k != "threshold_source"} == \
           {k: v for k, v in mvtec.items() if k != "threshold_source"}


def rearrange_bottle(target: Path, per_type: int | None = None) -> Path:
    """Real bottle images out of the MVTec layout: train/, normal/, abnormal/<type>/, masks/<type>/<stem>.png
    (the ``_mask`` suffix dropped), and the same images in the MVTec layout under mvtec/bottle."""
    def take(folder):
        return sorted(folder.glob("*.png"))[:per_type]

    mvtec = target / "mvtec" / "bottle"
    for path in take(BOTTLE / "train" / "good"):
        _copy(path, target / "folder" / "train" / path.name)
        _copy(path, mvtec / "train" / "good" / path.name)
    for kind in sorted(p.name for p in (BOTTLE / "test").iterdir()):
        for path in take(BOTTLE / "test" / kind):
            _copy(path, target / "folder" / ("normal" if kind == "good" else f"abnormal/{kind}") / path.name)
            _copy(path, mvtec / "test" / kind / path.name)
            if kind != "good":
                mask = BOTTLE / "ground_truth" / kind / f"{path.stem}_mask.png"
                _copy(mask, target / "folder" / "masks" / kind / path.name)
                _copy(mask, mvtec / "ground_truth" / kind / mask.name)
    return target


@pytest.mark.skipif(not BOTTLE.is_dir(), reason="the real MVTec bottle images are not on this machine")
def test_real_bottle_subset_gives_the_mvtec_readers_numbers(tmp_path):
    root = rearrange_bottle(tmp_path, per_type=3)
    common = {**TINY, "data.image_size": 64, "output_dir": str(tmp_path / "runs")}
    folder = run_experiment({**common, "data.name": "folder", "data.root": str(root / "folder"), "data.train_dir": "train",
                             "data.test_normal_dir": "normal", "data.test_abnormal_dir": "abnormal",
                             "data.mask_dir": "masks"})
    mvtec = run_experiment({**common, "data.name": "mvtec", "data.root": str(root / "mvtec"), "data.category": "bottle"})
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_aupr", "pixel_aupr", "threshold"):
        assert folder["metrics"][key] == mvtec["metrics"][key], key
    assert folder["metrics"]["pixel_auroc"] is not None
