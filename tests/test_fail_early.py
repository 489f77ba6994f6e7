"""User errors found before any long work, in one line, and user data never replaced (issue 16)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_framework.dataloaders.dataloader_demo import ensure_demo
from anomaly_framework.cli import main
from anomaly_framework.models.model_ae import UNetAE
from anomaly_framework.models.model_base import check_image_size
from anomaly_framework.models.model_padim import PadimModel
from anomaly_framework.errors import FrameworkError


def _cli(tmp_path, data_root, *extra):
    return main(["--model", "padim", "--backbone", "resnet18", "--set", "model.pretrained=false", "--image-size", "32",
                 "--data-root", str(data_root), "--output-dir", str(tmp_path / "runs"), *extra])


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    return error[0]


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "fabric" / "train" / "good" / "mine.png"
    mine.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(mine)
    (tmp_path / "tiles").mkdir()  # empty, still the user's
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _cli(tmp_path / "out", tmp_path, "--dataset", "demo") != 0
    error = _one_line_error(capsys)
    assert str(tmp_path / "fabric") in error and "refusing" in error
    with pytest.raises(FrameworkError, match="refusing"):
        ensure_demo(tmp_path, "tiles")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert np.asarray(Image.open(mine)).max() == 7


@pytest.fixture
def custom_root(tmp_path, demo_root):
    """A writable copy of the demo category, read as custom data in the MVTec layout."""
    shutil.copytree(demo_root / "fabric", tmp_path / "data" / "fabric")
    return tmp_path / "data"


def _damage_and_expect(tmp_path, root, capsys, path: Path):
    assert _cli(tmp_path, root, "--dataset", "mvtec", "--category", "fabric") != 0
    error = _one_line_error(capsys)
    assert str(path) in error
    assert not (tmp_path / "runs").exists()  # stopped before the run folder, the fit and the evaluation
    return error


def test_corrupt_or_truncated_test_image_is_named_before_the_fit(tmp_path, custom_root, capsys):
    corrupt = sorted((custom_root / "fabric" / "test" / "hole").glob("*.png"))[-1]
    corrupt.write_bytes(b"not an image")
    _damage_and_expect(tmp_path, custom_root, capsys, corrupt)
    corrupt.unlink()
    truncated = sorted((custom_root / "fabric" / "test" / "good").glob("*.png"))[-1]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    _damage_and_expect(tmp_path, custom_root, capsys, truncated)


def test_mask_of_the_wrong_size_is_named_before_the_fit(tmp_path, custom_root, capsys):
    mask = sorted((custom_root / "fabric" / "ground_truth" / "stain").glob("*.png"))[-1]
    Image.open(mask).resize((100, 90)).save(mask)
    error = _damage_and_expect(tmp_path, custom_root, capsys, mask)
    assert "100x90" in error and "256x256" in error


def test_image_size_below_the_coarsest_stride_is_refused_naming_the_minimum(tmp_path, demo_root, capsys):
    assert _cli(tmp_path, demo_root, "--dataset", "demo", "--image-size", "7") != 0
    error = _one_line_error(capsys)
    assert "data.image_size=7" in error and "minimum is 16" in error  # ResNet-18 layer3: stride 16
    assert not (tmp_path / "runs").exists()
    model = PadimModel(backbone="resnet18", layers=(1, 2), pretrained=False)
    check_image_size(model, 8)  # layer2: stride 8 suffices
    with pytest.raises(FrameworkError, match="minimum is 8"):
        check_image_size(model, 7)


def test_unet_sizes_must_suit_its_poolings():
    model = UNetAE(depth=3, base_channels=4)
    check_image_size(model, 24)
    for size in (7, 20):
        with pytest.raises(FrameworkError, match="multiple of 8"):
            check_image_size(model, size)
