"""Frozen extractors in exported runtimes: same features as eager, exported once, one-line errors."""
import importlib.util

import pytest
import torch

from anomaly_framework.backbones.extractors import TimmFeatureExtractor, use_backbone_runtime
from anomaly_framework.backbones.runtimes import check_runtime, resolve_runtime
from anomaly_framework.errors import FrameworkError

AVAILABLE = ["torchscript"] + [name for name, packages in (("onnxruntime", ("onnx", "onnxruntime")),
                                                           ("openvino", ("onnx", "openvino")))
                               if all(importlib.util.find_spec(package) for package in packages)]


def _extractor() -> TimmFeatureExtractor:
    torch.manual_seed(0)
    return TimmFeatureExtractor("efficientnet_lite0", [1, 2], pretrained=False)


@pytest.mark.parametrize("runtime", AVAILABLE)
def test_features_equal_eager(runtime, tmp_path):
    extractor = _extractor()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = extractor.eager(images)
        extractor.use_runtime(runtime, tmp_path)
        got = extractor(images)
        odd_batch = extractor(images[:1])  # the export's batch is dynamic
    assert extractor.runtime_name("cpu") == runtime
    assert len(list(tmp_path.iterdir())) == 1  # one export for both batch sizes
    for want, have, single in zip(expected, got, odd_batch):
        assert have.shape == want.shape
        scale = want.abs().max()
        assert (have - want).abs().max() <= 1e-5 * scale
        assert (single - want[:1]).abs().max() <= 1e-5 * scale


def test_export_is_stored_once_and_reused(tmp_path):
    images = torch.randn(2, 3, 64, 64)
    first = _extractor()
    first.use_runtime("torchscript", tmp_path)
    with torch.no_grad():
        first(images)
    (stored,) = tmp_path.iterdir()
    written = stored.stat().st_mtime_ns
    second = _extractor()  # same weights: a new process's build
    second.use_runtime("torchscript", tmp_path)
    with torch.no_grad():
        second(images)
    assert list(tmp_path.iterdir()) == [stored] and stored.stat().st_mtime_ns == written
    with torch.no_grad():
        second(torch.randn(2, 3, 32, 32))  # another input size: another export
        different = _extractor()
        different.model.conv_stem.weight.add_(1)  # other weights: another export
        different.use_runtime("torchscript", tmp_path)
        different(images)
    assert len(list(tmp_path.iterdir())) == 3


def test_gradients_and_training_mode_stay_eager(tmp_path):
    extractor = _extractor()
    extractor.use_runtime("torchscript", tmp_path)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    extractor(images)[0].sum().backward()
    assert images.grad is not None and not list(tmp_path.iterdir())
    student = TimmFeatureExtractor("efficientnet_lite0", [1], pretrained=False, requires_grad=True)
    use_backbone_runtime(student, "torchscript", tmp_path)
    assert student.exported is None  # a trained extractor is never exported


def test_bad_runtime_names_are_one_line_errors(monkeypatch):
    with pytest.raises(FrameworkError, match=r"Unknown model.backbone_runtime 'tensorrt': use one of auto, torch"):
        check_runtime("tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    with pytest.raises(FrameworkError, match=r"needs the package 'openvino', which is not installed") as error:
        check_runtime("openvino")
    assert "\n" not in str(error.value)


def test_auto_rule():
    assert resolve_runtime("auto", "cuda") == "torch"
    expected = "onnxruntime" if "onnxruntime" in AVAILABLE else "torchscript"
    assert resolve_runtime("auto", "cpu") == expected
    assert resolve_runtime("torchscript", "cuda") == "torchscript"


def test_vit_extractor_exports_with_a_dynamic_batch(tmp_path):
    from anomaly_framework.backbones.extractors import ViTFeatureExtractor

    torch.manual_seed(0)
    extractor = ViTFeatureExtractor("vit_tiny_patch16_224", block_index=1, pretrained=False)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        (expected,) = extractor.eager(images)
        extractor.use_runtime("torchscript", tmp_path)
        (single,) = extractor(images[:1])  # exported with a batch of 2
        (got,) = extractor(images)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale and (single - expected[:1]).abs().max() <= 1e-5 * scale


def test_unwritable_export_folder_warns_and_runs_eagerly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the folder should be: mkdir fails
    extractor = _extractor()
    extractor.use_runtime("torchscript", blocker / "backbones")
    images = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="Cannot store the torchscript backbone"), torch.no_grad():
        got = extractor(images)
    with torch.no_grad():
        for want, have in zip(extractor.eager(images), got):
            assert torch.equal(want, have)
