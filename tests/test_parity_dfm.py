"""Parity of DFM with anomalib 2.7.0's DFM, stage by stage (tests/fixtures/parity/dfm.npz, made by
tools/parity/make_fixtures_rd_dfm.py on fixed layer3 feature maps), and its leave-one-out scores
against a brute-force refit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_framework.modelers.modeler_dfm import DFMModeler
from anomaly_framework.models.model_dfm import DFMModel

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "dfm.npz"


@pytest.fixture(scope="module")
def fixture() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def _fitted(fixture: dict, score_type: str, rows: slice = slice(None)) -> DFMModel:
    model = DFMModel("resnet18", [3], pretrained=False, pooling_kernel_size=4, pca_level=0.97, score_type=score_type)
    model.begin_fit(12)
    model.update([torch.from_numpy(fixture["train_features"][rows])])
    model.finalize()
    return model.eval()


def _close(ours: torch.Tensor, official: np.ndarray, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(official, dtype=torch.float32)
    torch.testing.assert_close(ours.float(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_source_is_pinned(fixture):
    assert json.loads(str(fixture["source"]))["repository"].startswith("open-edge-platform/anomalib")


def test_pooled_features_and_pca_equal_the_reference(fixture):
    model = _fitted(fixture, "fre")
    _close(model.pooled([torch.from_numpy(fixture["train_features"])]).flatten(1), fixture["train_pooled"])
    _close(model.pca_mean, fixture["pca_mean"])
    assert model.pca_components.shape == fixture["pca_components"].shape  # the reference's component count
    # Directions are defined up to sign: compare the projector onto the kept subspace.
    ours, reference = model.pca_components, torch.from_numpy(fixture["pca_components"])
    _close(ours @ ours.T, (reference @ reference.T).numpy())


def test_fre_scores_and_map_through_the_modeler_equal_the_reference(fixture):
    modeler = DFMModeler(_fitted(fixture, "fre"))
    batch = {"image": torch.zeros(4, 3, 32, 32), "features": [torch.from_numpy(fixture["test_features"])]}
    result = modeler.evaluate_step(batch)
    _close(result["anomaly_scores"], fixture["fre_scores"])
    _close(result["anomaly_maps"], fixture["fre_maps"])


def test_nll_scores_equal_the_reference_gaussian(fixture):
    outputs = _fitted(fixture, "nll")([torch.from_numpy(fixture["test_features"])])
    _close(outputs["image_scores"], fixture["nll_scores"])


@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_leave_one_out_equals_a_refit_without_the_image(fixture, score_type):
    model = _fitted(fixture, score_type)
    features = torch.from_numpy(fixture["train_features"])
    positions = torch.tensor([0, 5, 11])
    left_out = model.leave_one_out([features[positions]], positions)
    for row, position in enumerate(positions.tolist()):
        keep = [i for i in range(12) if i != position]
        refit = _fitted(fixture, score_type, keep)([features[position:position + 1]])
        _close(left_out["image_scores"][row:row + 1], refit["image_scores"].numpy(), rtol=1e-4)
        _close(left_out["patch_scores"][row:row + 1], refit["patch_scores"].numpy(), rtol=1e-4)
    _close(model([features])["image_scores"], _fitted(fixture, score_type)([features])["image_scores"].numpy())


def test_defaults_are_the_reference_ones(fixture):
    """MODEL_CONFIGS["dfm"] against anomalib's Dfm() signature and default pre-processor, as the fixture read them."""
    from anomaly_framework.config import resolve_config

    reference = json.loads(str(fixture["defaults"]))
    config = resolve_config({"model.name": "dfm"})
    model = config["model"]
    layer = DFMModel("resnet50", model["layers"], pretrained=False).extractor.layers
    assert (model["backbone"], layer, model["pretrained"]) == (reference["backbone"], [reference["layer"]],
                                                               reference["pre_trained"])
    assert (model["pooling_kernel_size"], model["pca_level"], model["score_type"]) == (
        reference["pooling_kernel_size"], reference["pca_level"], reference["score_type"])
    assert [config["data"]["image_size"]] * 2 == reference["image_size"] and config["data"]["crop_ratio"] == 1.0
