"""Parity with the official code: each stage of our models and metrics against numbers the official code
computed on the same fixed inputs (tests/fixtures/parity/*.npz, made by tools/parity/make_fixtures.py,
which names the repository, commit and function of each). Tolerances: relative 1e-5 where both sides
compute in float64 or sum identically, 1e-4 where float32 summation orders differ."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from anomaly_framework import models  # noqa: F401  (metrics.ssim and models import each other: models must load first)
from anomaly_framework.metrics.lpips import LPIPS
from anomaly_framework.metrics.metrics_base import aupro
from anomaly_framework.metrics.ssim import ssim_map
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.models.flow_components import AllInOneCoupling
from anomaly_framework.models.model_draem import DraemModel, focal_loss
from anomaly_framework.models.model_fastflow import FastFlowModel
from anomaly_framework.models.model_padim import PadimModel
from anomaly_framework.models.model_patchcore import PatchcoreModel, greedy_select
from anomaly_framework.models.model_stfpm import STFPMModel

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def _layers(fixture: dict, prefix: str, numbers) -> list[torch.Tensor]:
    return [torch.from_numpy(fixture[f"{prefix}_layer{n}"]).float() for n in numbers]


class _FixedFeatures(nn.Module):
    """Stands in for the backbone: returns the fixture's feature maps whatever the images."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.features, self.channels = features, [f.shape[1] for f in features]

    def forward(self, images) -> list[torch.Tensor]:
        return self.features


def seeded_alexnet_state(seed: int = 7) -> dict[str, torch.Tensor]:
    """A random AlexNet trunk (torchvision naming) drawn from a torch generator, He-scaled so that the
    activations stay O(1); the LPIPS fixture was computed with exactly these weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in torchvision.models.alexnet().features.named_children():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            state[f"features.{name}.weight"] = torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
            state[f"features.{name}.bias"] = torch.randn(module.bias.shape, generator=generator) * 0.01
    return state


def test_every_fixture_names_its_official_source():
    files = sorted(FIXTURES.glob("*.npz"))
    assert {f.stem for f in files} >= {"padim", "patchcore", "stfpm", "aupro", "ssim_lpips"}
    for path in files:
        source = json.loads(str(_fixture(path.stem)["source"]))
        assert source["repository"] and source["commit"] and source["functions"], path.name


# -- PaDiM ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padim():
    fixture = _fixture("padim")
    model = PadimModel("resnet18", layers=(1, 2, 3), pretrained=False, n_features=100)
    model.feature_index = torch.from_numpy(fixture["feature_index"])  # the official random.sample draw
    model.extractor = _FixedFeatures(_layers(fixture, "train", (1, 2, 3)))
    return model, fixture


def test_padim_embedding_alignment_concatenation_and_channel_selection(padim):
    model, fixture = padim
    embedding = model.embed(model.extractor.features)
    np.testing.assert_array_equal(embedding[0].numpy(), fixture["embedding_image0"])


def test_padim_mean_and_regularised_covariance(padim):
    model, fixture = padim
    model.begin_fit(16)
    model.update(model.extractor.features)
    covariance = model._scatter / (model._count - 1) + 0.01 * torch.eye(100)
    model.finalize()
    np.testing.assert_allclose(model.mean.T.numpy(), fixture["mean"], rtol=1e-5, atol=1e-6)
    diagonal = covariance.diagonal(dim1=1, dim2=2).T.numpy()
    np.testing.assert_allclose(diagonal, fixture["cov_diag"], rtol=1e-5)
    np.testing.assert_allclose(covariance[5].numpy(), fixture["cov_position5"], rtol=1e-4, atol=1e-6)


def test_padim_mahalanobis_map_upsampling_smoothing_and_image_score(padim):
    model, fixture = padim
    model.begin_fit(16)
    model.update(model.extractor.features)
    model.finalize()
    model.extractor = _FixedFeatures(_layers(fixture, "test", (1, 2, 3)))
    distance = model(model.extractor.features)["patch_scores"]
    np.testing.assert_allclose(distance[:, 0].numpy(), fixture["distance"], rtol=1e-4)
    # Upsampling and smoothing on the official distances, to pin these stages alone.
    size = int(fixture["size"])
    official = torch.from_numpy(fixture["distance"]).unsqueeze(1)
    upsampled = torch.nn.functional.interpolate(official, size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsampled[:, 0].numpy(), fixture["upsampled"], rtol=1e-6)
    smoothed = BaseModeler.smooth_to_input(official.double(), (size, size), 4.0)[:, 0]
    np.testing.assert_allclose(smoothed.numpy(), fixture["smoothed"], rtol=1e-5)
    # Image score: the map's maximum (the official code min-max normalises over the test set first).
    ours = BaseModeler.smooth_to_input(distance, (size, size), 4.0)
    scores = (ours - ours.min()) / (ours.max() - ours.min())
    official_scores = fixture["scores"].reshape(len(scores), -1).max(1)
    np.testing.assert_allclose(scores.amax(dim=(1, 2, 3)).numpy(), official_scores, rtol=1e-4)


# -- PatchCore ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patchcore():
    fixture = _fixture("patchcore")
    model = PatchcoreModel("resnet18", layers=(2, 3), pretrained=False, coreset_ratio=1.0, score_mode="max")
    model.extractor = _FixedFeatures(_layers(fixture, "train", (2, 3)))
    model.begin_fit(4)
    model.update(model.extractor.features)
    model.finalize()
    model.extractor = _FixedFeatures(_layers(fixture, "test", (2, 3)))
    return model, fixture


@pytest.mark.parametrize("fused", [False, True])
def test_patchcore_local_aggregation_and_1024_projection_chain(patchcore, fused):
    model, fixture = patchcore
    assert not model.fused  # resnet18's layer3 is wide enough for the pooling path
    if fused:  # the same chain as one convolution per layer
        model.fused = True
        for index, weight in enumerate(model._projection_weights()):
            model.register_buffer(f"aggregation_{index}", weight, persistent=False)
    try:
        embedding = model.embed(model.extractor.features)[0].reshape(-1, 1024)
    finally:
        model.fused = False
    np.testing.assert_allclose(embedding.numpy(), fixture["embedding_test0"], rtol=1e-4, atol=1e-6)


def test_patchcore_nearest_neighbour_scores_image_score_and_map(patchcore):
    """The official scorer is faiss IndexFlatL2, which returns *squared* distances: the official patch
    scores, image score and map are those of our Euclidean distances squared (image ranking is the same)."""
    model, fixture = patchcore
    outputs = model(model.extractor.features)
    squared = outputs["patch_scores"][:, 0].square()
    np.testing.assert_allclose(squared.numpy(), fixture["nn_squared_distances"], rtol=1e-4)
    np.testing.assert_allclose(outputs["image_scores"].square().numpy(), fixture["image_scores"], rtol=1e-4)
    size = int(fixture["size"])
    maps = BaseModeler.smooth_to_input(outputs["patch_scores"].square(), (size, size), 4.0)[:, 0]
    np.testing.assert_allclose(maps.numpy(), fixture["maps"], rtol=1e-4)


def test_patchcore_approximate_greedy_coreset_indices():
    fixture = _fixture("patchcore")
    features = torch.from_numpy(fixture["coreset_features"]).float()
    mapper = torch.from_numpy(fixture["coreset_projection"]).T  # nn.Linear weight [d, D] -> [D, d]
    starts = torch.from_numpy(fixture["coreset_starts"])
    count = len(fixture["coreset_indices"])
    selected = greedy_select(features, mapper, starts, count, progress=False)
    np.testing.assert_array_equal(selected.numpy(), fixture["coreset_indices"])


# -- STFPM ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stfpm():
    fixture = _fixture("stfpm")
    outputs = {"teacher": _layers(fixture, "teacher", (1, 2, 3)), "student": _layers(fixture, "student", (1, 2, 3))}
    return STFPMModel("resnet18", pretrained=False), outputs, fixture


def test_stfpm_loss_on_fixed_features(stfpm):
    model, outputs, fixture = stfpm
    assert model.loss(outputs).item() == pytest.approx(float(fixture["loss"]), rel=1e-5)


def test_stfpm_anomaly_map(stfpm):
    model, outputs, fixture = stfpm
    np.testing.assert_allclose(model.anomaly_map(outputs, (64, 64))[:, 0].numpy(), fixture["map64"], rtol=1e-5)
    grid = fixture["final_grid"]
    final = model.anomaly_map(outputs, (256, 256))[:, 0][:, grid][:, :, grid]
    np.testing.assert_allclose(final.numpy(), fixture["final_on_grid"], rtol=1e-4, atol=1e-7)


# -- metrics --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("maps", ["maps", "quantised"])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_the_mvtec_evaluation_code(maps, limit):
    fixture = _fixture("aupro")
    ours = aupro(fixture["masks"], fixture[maps], fpr_limit=limit)
    assert ours == pytest.approx(float(fixture[f"{maps}_aupro_{limit}"]), rel=1e-5)


def test_ssim_equals_pytorch_msssim_on_the_valid_region():
    """pytorch_msssim averages SSIM over the window's valid positions; ours pads, so crop its border."""
    fixture = _fixture("ssim_lpips")
    x, y = (torch.from_numpy(fixture[k]).double() for k in ("x", "y"))
    ours = ssim_map(x, y, 1.0)[:, :, 5:-5, 5:-5].mean(dim=(1, 2, 3))
    np.testing.assert_allclose(ours.numpy(), fixture["ssim"], rtol=1e-5)


def test_lpips_equals_the_lpips_package():
    fixture = _fixture("ssim_lpips")
    heads, start = {}, 0
    for k, channels in enumerate((64, 192, 384, 256, 256)):
        heads[f"lin{k}.model.1.weight"] = torch.from_numpy(fixture["lpips_heads"][start:start + channels]).view(1, -1, 1, 1)
        start += channels
    model = LPIPS(seeded_alexnet_state(), heads)
    x, y = (torch.from_numpy(fixture[k]).float()[:, :, :40, :40] * 2 - 1 for k in ("x", "y"))
    np.testing.assert_allclose(model(x, y).numpy(), fixture["lpips"], rtol=1e-4)


# -- FastFlow -------------------------------------------------------------------------------------------
def test_fastflow_coupling_block_equals_freia_all_in_one_block():
    fixture = _fixture("fastflow")
    block = AllInOneCoupling(7, kernel_size=3, hidden_ratio=1.0, clamp=2.0)
    subnet = {key[len("block_subnet_"):].replace("_", "."): torch.from_numpy(value)
              for key, value in fixture.items() if key.startswith("block_subnet_")}
    block.subnet.load_state_dict(subnet)
    permutation = torch.from_numpy(fixture["block_permutation"])
    block.load_state_dict({**block.state_dict(), "permutation": permutation, "inverse_permutation": permutation.argsort(),
                           "global_scale": torch.from_numpy(fixture["block_global_scale"]),
                           "global_offset": torch.from_numpy(fixture["block_global_offset"])}, strict=True)
    with torch.no_grad():
        y, log_det = block(torch.from_numpy(fixture["block_x"]).float())
    np.testing.assert_allclose(y.numpy(), fixture["block_y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_det.numpy(), fixture["block_log_det"], rtol=1e-5)


def test_fastflow_loss_and_anomaly_map_formulas():
    fixture = _fixture("fastflow")
    outputs = {"z": [torch.from_numpy(fixture[f"z{i}"]) for i in range(3)],
               "log_det": [torch.from_numpy(fixture[f"log_det{i}"]) for i in range(3)]}
    assert FastFlowModel.loss(outputs).item() == pytest.approx(float(fixture["loss"]), rel=1e-5)
    np.testing.assert_allclose(FastFlowModel.anomaly_map(outputs, (32, 32)).numpy(), fixture["anomaly_map"], rtol=1e-5)


# -- DRAEM ----------------------------------------------------------------------------------------------
def test_draem_focal_loss_ssim_loss_and_image_score():
    fixture = _fixture("draem")
    probabilities = torch.from_numpy(fixture["focal_logits"]).softmax(dim=1)
    focal = focal_loss(probabilities, torch.from_numpy(fixture["focal_masks"]))
    assert focal.item() == pytest.approx(float(fixture["focal"]), rel=1e-5)
    clean, reconstruction = (torch.from_numpy(fixture[k]).float() for k in ("ssim_clean", "ssim_reconstruction"))
    model = DraemModel(reconstructive_width=2, discriminative_width=2, image_size=32)
    losses = model.loss({"reconstruction": reconstruction, "logits": torch.zeros(2, 2, 32, 32)}, clean, torch.zeros(2, 1, 32, 32))
    assert losses["ssim_loss"].item() == pytest.approx(float(fixture["ssim_loss"]), rel=1e-5)
    logits = torch.from_numpy(fixture["score_logits_16"]).repeat_interleave(16, 2).repeat_interleave(16, 3)
    scores = model.image_score(DraemModel.anomaly_map({"logits": logits}))
    np.testing.assert_allclose(scores.numpy(), fixture["image_scores"], rtol=1e-5)


def test_draem_anomaly_simulation_matches_the_official_generator_in_distribution():
    """Mask coverage, share of anomalous draws and β of 400 draws each, ours against the official
    augment_image: two-sample KS statistics below the 1 % critical value (our draws are seeded, so the
    outcome is fixed, and a wrong Perlin scale range, threshold, rotation or β range moves them far above)."""
    from scipy.stats import ks_2samp

    from anomaly_framework.dataloaders.anomaly_simulation import simulate_anomaly

    fixture = _fixture("draem")
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 0.5, dtype=np.float32)
    texture = rng.random((64, 64, 3)).astype(np.float32)
    coverage, betas = [], []
    for _ in range(400):
        augmented, mask, has_anomaly = simulate_anomaly(image, texture, rng)
        coverage.append(mask.mean())
        inside = mask[..., 0] > 0
        if inside.any():
            betas.append(float(np.median((augmented - texture)[inside] / (image - texture)[inside])))
    coverage = np.array(coverage)
    official = fixture["simulation_coverage"][fixture["simulation_anomalous"] > 0]
    ours = coverage[coverage > 0]
    critical = lambda n, m: 1.63 * np.sqrt((n + m) / (n * m))  # noqa: E731  (KS, α = 0.01)
    assert abs(len(ours) / 400 - len(official) / 400) < 0.1
    assert ks_2samp(ours, official).statistic < critical(len(ours), len(official))
    official_betas = fixture["simulation_beta"]
    assert 0.0 <= min(betas) and max(betas) < 0.8
    assert ks_2samp(betas, official_betas).statistic < critical(len(betas), len(official_betas))
