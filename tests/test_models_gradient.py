"""SSIM/PSNR against references, and the reconstruction models: shapes, losses, determinism, a run."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly_framework.main import run_experiment
from anomaly_framework.metrics.ssim import SSIMLoss, psnr, ssim, ssim_map
from anomaly_framework.models.model_ae import UNetAE, VanillaAE
from anomaly_framework.models.model_stfpm import STFPMModel
from anomaly_framework.models.model_vae import UNetVAE, VanillaVAE


def _ssim_float64(x, y, data_range=1.0):
    """Wang et al. 2004 in float64 with scipy's Gaussian filter (σ 1.5, 11 taps, mirrored borders)."""
    blur = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=5 / 1.5, mode="mirror")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_ssim_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.random((32, 40))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ours = ssim_map(torch.tensor(x)[None, None].float(), torch.tensor(y)[None, None].float(), 1.0)[0, 0]
    assert np.allclose(ours.numpy(), _ssim_float64(x, y), atol=1e-4)
    same = torch.rand(2, 3, 24, 24)
    assert torch.allclose(ssim(same, same, 1.0), torch.tensor(1.0))


def test_psnr_known_case_and_ssim_loss_gradients():
    x = torch.zeros(2, 3, 8, 8)
    assert torch.allclose(psnr(x + 0.1, x, 1.0), torch.full((2,), 20.0), atol=1e-4)
    prediction = torch.rand(1, 3, 16, 16, requires_grad=True)
    SSIMLoss(1.0)(prediction, torch.rand(1, 3, 16, 16)).backward()
    assert torch.isfinite(prediction.grad).all()


@pytest.mark.parametrize("model_class, kwargs", [
    (VanillaAE, {"image_size": 64, "base_channels": 8, "latent_dim": 16}),
    (UNetAE, {"base_channels": 8, "depth": 3}),
    (VanillaVAE, {"image_size": 64, "base_channels": 8, "latent_dim": 16}),
    (UNetVAE, {"base_channels": 8, "depth": 3}),
])
def test_reconstruction_models_shapes_and_loss_decreases(model_class, kwargs):
    torch.manual_seed(0)
    model = model_class(**kwargs)
    images = torch.rand(4, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        outputs = model(images)
        loss = model.criterion(outputs, images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert outputs["reconstruction"].shape == images.shape
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images)["reconstruction"], model(images)["reconstruction"])  # VAEs use μ


def test_stfpm_map_is_zero_when_student_equals_teacher():
    model = STFPMModel(backbone="resnet18", pretrained=False).eval()
    model.student.load_state_dict(model.teacher.state_dict())
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64))
    assert model.anomaly_map(outputs, (64, 64)).abs().max() < 1e-6
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())


def test_autoencoder_end_to_end_reports_psnr_and_ssim(tmp_path, demo_root, scores_auroc):
    results = run_experiment({
        "model": {"name": "ae", "base_channels": 8, "latent_dim": 16},
        "data": {"name": "demo", "root": str(demo_root), "image_size": 64, "batch_size": 8},
        "train": {"epochs": 2, "lr": 1e-3},
        "output_dir": str(tmp_path), "eval": {"num_figures": 1},
    })
    last = results["fit"]["history"][-1]
    assert {"psnr", "ssim", "l2"} <= set(last["train"]) and "psnr" in last["valid"]
    assert results["metrics"]["image_auroc"] == pytest.approx(scores_auroc(results["run_dir"]), abs=1e-9)
