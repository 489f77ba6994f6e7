"""Out-of-sample threshold calibration of the memory models: leave-one-image-out scores against brute force.

The in-sample scores of a memory model's own training images are biased low (PatchCore finds each
patch in its bank at distance 0), so the default threshold is set on leave-one-out scores instead.
"""
import pytest
import torch

from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_padim import COVARIANCE_EPS, PadimModel
from anomaly_framework.models.model_patchcore import PatchcoreModel


def _fit(model, images):
    model.begin_fit(len(images))
    for batch in images.split(4):
        model.update(batch)
    model.finalize()
    return model


def test_padim_leave_one_out_equals_gaussians_fitted_without_the_image():
    torch.manual_seed(0)
    images = torch.rand(9, 3, 32, 32)
    model = _fit(PadimModel(backbone="resnet18", pretrained=False, n_features=24), images)
    held_out = model.leave_one_out(images[:3], torch.arange(3))["patch_scores"].double()

    samples = model.embed(images).double()  # [N, d, h, w]
    n, dim = samples.shape[:2]
    samples = samples.permute(2, 3, 0, 1).reshape(-1, n, dim)  # [P, N, d]
    for i in range(3):
        others = torch.cat([samples[:, :i], samples[:, i + 1:]], dim=1)
        mean = others.mean(dim=1)
        centred = others - mean.unsqueeze(1)
        # The fit's normaliser n − 1, so that leaving one out is an exact rank-one downdate.
        covariance = centred.transpose(1, 2) @ centred / (n - 1) + COVARIANCE_EPS * torch.eye(dim, dtype=torch.float64)
        delta = samples[:, i] - mean
        expected = (delta.unsqueeze(1) @ torch.linalg.solve(covariance, delta.unsqueeze(2))).reshape(-1).sqrt()
        assert torch.allclose(held_out[i, 0].reshape(-1), expected, rtol=2e-3)
    in_sample = model(images[:3])["patch_scores"]
    assert (held_out > in_sample.double()).all()


@pytest.mark.parametrize("coreset_ratio, score_mode", [(1.0, "max"), (0.3, "reweighted")])
def test_patchcore_leave_one_out_excludes_exactly_the_image_own_patches(coreset_ratio, score_mode):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32)
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
    metrics = run_experiment(config)["metrics"]
    assert metrics["threshold_source"] == "normal_quantile(q=1.0) on train/good, leave-one-image-out (40 images)"
    assert "map maxima" in metrics["pixel_threshold_source"]
    assert metrics["pixel_threshold"] is not None and metrics["threshold"] > 0
