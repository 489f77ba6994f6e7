"""Out-of-sample threshold calibration of the memory models: leave-one-image-out scores against brute force.

The in-sample scores of a memory model's own training images are biased low (PatchCore finds each
patch in its bank at distance 0), so the default threshold is set on leave-one-out scores instead.
"""
import numpy as np
import pytest
import torch

from anomaly_framework.main import run_experiment
from anomaly_framework.models import model_padim
from anomaly_framework.models.model_padim import COVARIANCE_EPS, PadimModel
from anomaly_framework.models.model_patchcore import PatchcoreModel


def _fit(model, images):
    model.begin_fit(len(images))
    for batch in images.split(4):
        model.update(batch)
    model.finalize()
    return model


def _padim_refit_distances(samples: torch.Tensor, i: int) -> torch.Tensor:
    """Brute force in float64: Gaussians fitted on every image but ``i`` (normaliser n − 2, ε·I), image i's distances.
    Solved by numpy, a reference apart from torch (torch 2.14's batched float64 solve on the CPU can spin
    forever in MKL's nested OpenMP team with two threads: seen once on a fresh virtualenv)."""
    samples = samples.numpy()
    n, dim = samples.shape[1:]
    others = np.concatenate([samples[:, :i], samples[:, i + 1:]], axis=1)
    mean = others.mean(axis=1)
    centred = others - mean[:, None]
    covariance = centred.transpose(0, 2, 1) @ centred / (n - 2) + COVARIANCE_EPS * np.eye(dim)
    delta = samples[:, i] - mean
    return torch.from_numpy(np.sqrt((delta[:, None] @ np.linalg.solve(covariance, delta[:, :, None])).reshape(-1)))


@pytest.mark.parametrize("count, dim, scale", [(3, 24, 1.0), (8, 176, 6.0), (12, 64, 6.0), (40, 8, 1.0)])
@pytest.mark.parametrize("cache_bytes", [2**30, 0])  # factors kept across batches, or recomputed for each
def test_padim_leave_one_out_equals_gaussians_refitted_without_the_image(count, dim, scale, cache_bytes, monkeypatch):
    """n < d (8 images of 176 channels in [0, 6], as Lite0's on bottle's 8-image subset: an image is its own
    direction of the covariance) and n > d, against a float64 refit without the image."""
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", pretrained=False, n_features=dim)
    grids = [(64, 4), (128, 2), (256, 1)]  # resnet18 layers 1–3 on a 4×4 grid
    features = [torch.rand(count, channels, size, size) * scale for channels, size in grids]
    model.begin_fit(count)
    for part in range(0, count, 4):
        model.update([f[part:part + 4] for f in features])
    model.finalize()
    monkeypatch.setattr(model_padim, "LEAVE_ONE_OUT_CACHE_BYTES", cache_bytes)
    halves = [model.leave_one_out([f[part] for f in features], torch.arange(count)[part])["patch_scores"]
              for part in (slice(0, count // 2), slice(count // 2, None))]  # two batches of the calibration pass
    held_out = model.leave_one_out(features, torch.arange(count))["patch_scores"].double()
    assert torch.allclose(torch.cat(halves).double(), held_out, rtol=1e-6)
    assert len(model._refit_factors) == (1 if cache_bytes else 0)
    samples = model.embed(features).double()  # [N, d, h, w]
    samples = samples.permute(2, 3, 0, 1).reshape(-1, count, dim)  # [P, N, d]
    for i in range(count):
        assert torch.allclose(held_out[i, 0].reshape(-1), _padim_refit_distances(samples, i), rtol=1e-3)
    assert (held_out > model(features)["patch_scores"].double()).all()


@pytest.mark.parametrize("count, coreset_ratio, score_mode", [(5, 1.0, "max"), (5, 0.3, "reweighted"), (3, 0.3, "max")])
def test_patchcore_leave_one_out_excludes_exactly_the_image_own_patches(count, coreset_ratio, score_mode):
    torch.manual_seed(0)
    images = torch.rand(count, 3, 32, 32)
    model = PatchcoreModel(backbone="resnet18", pretrained=False, coreset_ratio=coreset_ratio, score_mode=score_mode,
                           pre_embed_dim=64, embed_dim=64, num_neighbors=3, chunk_mb=0.002)  # tiny chunks: exclusion across chunk borders
    _fit(model, images)
    embedding = model.embed(images)  # [N, h, w, D]
    per_image = embedding.shape[1] * embedding.shape[2]
    assert model.bank_source.numel() == model.memory_bank.shape[0]
    out = model.leave_one_out(images, torch.arange(len(images)))
    for i in range(len(images)):
        others = model.memory_bank[model.bank_source != i]
        distances = torch.cdist(embedding[i].reshape(per_image, -1), others)
        nearest, match = distances.min(dim=1)
        assert torch.allclose(out["patch_scores"][i].reshape(-1), nearest, atol=1e-3)
        worst = nearest.argmax()
        expected = nearest[worst]
        if score_mode == "reweighted":
            support = torch.cdist(others[match[worst]][None], others)[0].topk(3, largest=False).indices
            to_query = (others[support] - embedding[i].reshape(per_image, -1)[worst]).norm(dim=1)
            expected = expected * (1 - torch.softmax(to_query, 0)[0])
        assert torch.allclose(out["image_scores"][i], expected, rtol=1e-4)
    if coreset_ratio == 1.0:  # in sample every patch is in the bank: all distances 0
        assert model(images)["patch_scores"].abs().max() < 1e-2


def test_default_threshold_uses_leave_one_out_scores_of_the_training_images(tmp_path, demo_root):
    config = {"model": {"name": "patchcore", "backbone": "resnet18", "pretrained": False, "coreset_ratio": 0.5},
              "data": {"name": "demo", "root": str(demo_root), "image_size": 32, "batch_size": 16},
              "output_dir": str(tmp_path), "eval": {"num_figures": 0, "save_checkpoint": False}}
    with pytest.warns(UserWarning, match="cannot be certified"):  # 40 images: the maximum, rank 40
        metrics = run_experiment(config)["metrics"]
    assert metrics["threshold_source"] == ("false_alarm_rate=0.05 at confidence 0.9: rank 40 (ascending) of the "
                                           "scores of train/good, leave-one-image-out (40 images)")
    assert "map maxima" in metrics["pixel_threshold_source"]
    assert metrics["pixel_threshold"] is not None and metrics["threshold"] > 0
