"""LPIPS (AlexNet, v0.1) against a brute-force float64 re-implementation; weight loading; the offline path."""
import warnings

from anomaly_framework import models  # noqa: F401  (metrics.ssim and models import each other: models must load first)
import pytest
import torch
import torchvision

import anomaly_framework.metrics.lpips as lpips_module
from anomaly_framework.metrics.lpips import CHANNELS, LPIPS, load_lpips, to_lpips_range
from anomaly_framework.metrics.metrics_gradient import GradientMetrics
from anomaly_framework.errors import FrameworkError
from anomaly_framework.ops.normalize import denormalize


@pytest.fixture(scope="module")
def weights():
    """Seeded random AlexNet trunk in torchvision naming, and non-negative heads in the lpips naming."""
    torch.manual_seed(0)
    trunk = {f"features.{key}": value for key, value in torchvision.models.alexnet().features.state_dict().items()}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    return trunk, heads


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No weight files anywhere, an unreachable hub and an empty torch hub cache.

    Returns the (empty) weights folder and the list of hosts the reachability check was asked about.
    """
    backbones = tmp_path / "weights"
    backbones.mkdir()
    calls = []
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(backbones))
    monkeypatch.setattr(lpips_module, "hub_reachable", lambda host: calls.append(host) or False)
    monkeypatch.setattr(lpips_module, "_package_head_file", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return backbones, calls


def _brute_force(trunk, heads, x, y):
    """Zhang et al.'s formula written out: AlexNet layer by layer, taps at every ReLU, explicit sums."""
    layers = torchvision.models.alexnet().features.double()
    layers.load_state_dict({key[len("features."):]: value for key, value in trunk.items()})
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    taps = []
    for image in (x.double(), y.double()):
        h, found = (image - shift) / scale, []
        for layer in layers:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                found.append(h.clone())
        taps.append(found)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (fx, fy) in enumerate(zip(*taps)):
        nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        weight = heads[f"lin{k}.model.1.weight"].double().flatten()
        total += torch.einsum("bchw,c->b", (nx - ny) ** 2, weight) / (fx.shape[2] * fx.shape[3])
    return total


def test_matches_brute_force_and_basic_properties(weights):
    trunk, heads = weights
    model = LPIPS(trunk, heads)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 64, 72) * 2 - 1
    y = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        ours = model(x, y)
        assert ours.shape == (3,)
        assert torch.allclose(ours.double(), _brute_force(trunk, heads, x, y), rtol=1e-5, atol=1e-5)
        assert (ours > 0).all()
        assert torch.equal(model(x, x), torch.zeros(3))
        assert torch.equal(model(x, y), model(y, x))
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(to_lpips_range(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))


def test_loads_explicit_files_and_backbones_folder(weights, offline, tmp_path):
    trunk, heads = weights
    backbones, hub_calls = offline
    full_alexnet = {**trunk, "classifier.1.weight": torch.zeros(2, 2)}  # a whole torchvision state dict
    trunk_file, head_file = tmp_path / "trunk.pth", tmp_path / "alex.pth"
    torch.save(full_alexnet, trunk_file)
    torch.save(heads, head_file)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = LPIPS(trunk, heads)(x, y)
        model, source = load_lpips(trunk_file, head_file)
        assert str(trunk_file) in source and str(head_file) in source
        assert torch.equal(model(x, y), expected)
        torch.save(trunk, backbones / "alexnet.pth")
        torch.save(heads, backbones / "lpips_alex_v0.1.pth")
        model, source = load_lpips()
        assert str(backbones / "alexnet.pth") in source
        assert torch.equal(model(x, y), expected)
    assert not hub_calls
    with pytest.raises(FrameworkError, match="missing.pth"):
        load_lpips(trunk_weights=tmp_path / "missing.pth")


def test_unavailable_weights_give_none_and_the_files_to_place(weights, offline):
    backbones, hub_calls = offline
    model, reason = load_lpips()
    assert model is None and "alexnet.pth" in reason and "lpips_alex_v0.1.pth" in reason
    assert not hub_calls  # without heads the trunk is not worth downloading
    torch.save(weights[1], backbones / "lpips_alex_v0.1.pth")
    model, reason = load_lpips()
    assert model is None and "alexnet.pth" in reason and "lpips_alex_v0.1" not in reason
    assert hub_calls == ["download.pytorch.org"]


@pytest.mark.parametrize("broken", [
    {"lin0.model.1.weight": torch.rand(1, 32, 1, 1)},
    {f"lin{k}.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)},
])
def test_malformed_files_name_the_file(weights, offline, tmp_path, broken):
    head_file, trunk_file = tmp_path / "heads.pth", tmp_path / "trunk.pth"
    torch.save(broken, head_file)
    torch.save(weights[0], trunk_file)
    with pytest.raises(FrameworkError, match="heads.pth.*lin0.model.1.weight"):
        load_lpips(trunk_file, head_file)
    torch.save({"features.0.weight": torch.zeros(1)}, trunk_file)
    with pytest.raises(FrameworkError, match="trunk.pth"):
        load_lpips(trunk_file, tmp_path / "heads.pth")


def test_gradient_metrics_report_lpips_only_with_weights(weights, offline):
    config = {"data": {"normalize": "imagenet"}, "model": {}}
    torch.manual_seed(2)
    batch = {"image": torch.randn(2, 3, 64, 64)}
    outputs = {"reconstruction": batch["image"] + 0.3 * torch.randn(2, 3, 64, 64)}
    metrics = GradientMetrics(config)
    with pytest.warns(UserWarning, match="alexnet.pth"):
        assert set(metrics.compute_valid_metrics(outputs, batch)) == {"psnr", "ssim"}
    assert "lpips_alex_v0.1.pth" in metrics.lpips_unavailable_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is reported once, not per batch
        assert set(metrics.compute_valid_metrics(outputs, batch)) == {"psnr", "ssim"}

    backbones, _ = offline
    torch.save(weights[0], backbones / "alexnet.pth")
    torch.save(weights[1], backbones / "lpips_alex_v0.1.pth")
    metrics = GradientMetrics(config)
    assert "lpips" not in metrics.compute_train_metrics(outputs, batch)
    valid = metrics.compute_valid_metrics(outputs, batch)
    images = [to_lpips_range(denormalize(t, "imagenet")) for t in (outputs["reconstruction"], batch["image"])]
    with torch.no_grad():
        expected = float(LPIPS(*weights)(*images).mean())
    assert metrics.lpips_unavailable_reason is None and valid["lpips"] == pytest.approx(expected, rel=1e-6)
