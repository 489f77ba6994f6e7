"""Parity of SimpleNet and SuperSimpleNet with their official code, stage by stage: aggregated features,
adaptor and discriminator/head outputs of two training steps with the official noise (and Perlin masks),
the losses, the weights after the two optimiser steps, the evaluation map and image score, and
SuperSimpleNet's Perlin masks from the official random draws. Fixtures: tools/parity/make_simplenet_fixtures.py
(which names the repository, commit and functions). Tolerance: relative 1e-5 (absolute 1e-6 near 0)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anomaly_framework.config import resolve_config
from anomaly_framework.models.model_simplenet import SimpleNetModel
from anomaly_framework.models.model_supersimplenet import SuperSimpleNetModel, perlin_feature_mask
from anomaly_framework.modelers.modeler_simplenet import SimpleNetModeler, SuperSimpleNetModeler

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
RTOL, ATOL = 1e-5, 1e-6
# Our parameter prefixes -> the official ones (fixture keys: "<stage><official name>").
SIMPLENET_KEYS = {"adaptor.0": "adaptor.layers.0fc", "discriminator.0": "discriminator.body.block1.0",
                  "discriminator.1": "discriminator.body.block1.1", "discriminator.3": "discriminator.tail"}
SUPERSIMPLENET_KEYS = {"adaptor": "feature_adaptor.projection", "segmentation": "discriminator.seg",
                       "classification": "discriminator.dec_head", "score": "discriminator.fc_score"}


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


class _Channels(nn.Module):
    """Stands in for the backbone where only its channel widths are read (features are passed in)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.channels = channels


def _official(fixture: dict, model: nn.Module, keys: dict[str, str], stage: str) -> dict[str, np.ndarray]:
    """{our parameter or buffer name: the fixture's official array at ``stage``}."""
    expected = {}
    for ours in model.state_dict():
        for our_prefix, their_prefix in keys.items():
            if ours.startswith(our_prefix + "."):
                expected[ours] = fixture[f"{stage}{their_prefix}{ours[len(our_prefix):]}"]
    return expected


def _load(model: nn.Module, expected: dict[str, np.ndarray]) -> None:
    model.load_state_dict({key: torch.from_numpy(value.astype(np.float32) if value.dtype == np.float16 else value)
                           for key, value in expected.items()}, strict=False)


def _assert_state(model: nn.Module, expected: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    assert expected
    for key, value in expected.items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=RTOL, atol=ATOL, err_msg=key)


def _config(optimizer: str, scheduler: str, decay: dict, size: int) -> dict:
    return {"model": {"name": "fixture"}, "data": {"image_size": size},
            "train": {"optimizer": optimizer, "lr": 2e-4, "weight_decay": decay["heads"], "adaptor_lr": 1e-4,
                      "adaptor_weight_decay": decay["adaptor"], "scheduler": scheduler, "epochs": 300,
                      "milestones": [0.8, 0.9], "gamma": 0.4}}


def _test_layers(fixture: dict) -> list[torch.Tensor]:
    """The stub backbone's layer2 and layer3 maps of the two test images (images 4 and 5)."""
    return [torch.from_numpy(fixture[f"layer{n}"][4:]).float() for n in (2, 3)]


def _official_steps(name: str, model: nn.Module, keys: dict[str, str], initial: str, optimizer: str, scheduler: str,
                    draws: list[str]) -> tuple[dict, SimpleNetModeler, list[dict]]:
    """The model at the official initial weights, trained two steps with the official random draws
    (fixture arrays named in ``draws``): the fixture, the modeler and the model's training outputs."""
    fixture = _fixture(name)
    decay = json.loads(str(fixture["source"]))["weight_decay"]
    _load(model, _official(fixture, model, keys, initial))
    modeler_class = SimpleNetModeler if name == "simplenet" else SuperSimpleNetModeler
    modeler = modeler_class(model, config=_config(optimizer, scheduler, decay, int(fixture["size"])))
    steps = [{draw: torch.from_numpy(fixture[f"{draw}s" if draw == "noise" else draw][step]) for draw in draws}
             for step in range(2)]
    return fixture, modeler, _train_two_steps(modeler, fixture, steps)


def _train_two_steps(modeler, fixture: dict, draws: list[dict]) -> list[dict]:
    """Two training steps on images 0–1 and 2–3 with the fixture's random draws; the model's outputs."""
    model = modeler.model
    layers = [torch.from_numpy(fixture[f"layer{n}"]).float() for n in (2, 3)]
    optimizer, _ = modeler.configure_optimizers()
    outputs = []
    forward = type(model).forward
    for step, draw in enumerate(draws):
        model.forward = lambda inputs, draw=draw: forward(model, inputs, **draw)
        handle = model.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            report = modeler.training_step({"features": [layer[2 * step:2 * step + 2] for layer in layers]}, optimizer)
        finally:
            handle.remove()
            del model.forward
        assert report["loss"] == pytest.approx(float(fixture["losses"][step]), rel=RTOL)
    return outputs


# -- SimpleNet ------------------------------------------------------------------------------------------
def _simplenet_model(fused: bool | None = None) -> SimpleNetModel:
    model = SimpleNetModel("resnet18", layers=(2, 3), pretrained=False, pre_embed_dim=48, embed_dim=48,
                           discriminator_hidden=32)
    model.extractor = _Channels([8, 16])
    model.init_aggregation()
    if fused is not None:
        model.fused = fused
        if fused:
            for index, weight in enumerate(model._projection_weights()):
                model.register_buffer(f"aggregation_{index}", weight, persistent=False)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_simplenet_locally_aggregated_features(fused):
    fixture = _fixture("simplenet")
    model = _simplenet_model(fused)
    layers = _test_layers(fixture)
    embedding = model.embed(layers).reshape(-1, 48)
    np.testing.assert_allclose(embedding.numpy(), fixture["embedding_test"], rtol=RTOL, atol=ATOL)


def test_simplenet_training_steps_losses_weights_and_evaluation():
    model = _simplenet_model()
    fixture, modeler, outputs = _official_steps("simplenet", model, SIMPLENET_KEYS, "initial_", "adam", "none", ["noise"])
    for step, output in enumerate(outputs):
        scores = torch.cat([output["true_scores"], output["fake_scores"]]).detach()
        np.testing.assert_allclose(scores.numpy(), fixture["train_scores"][step], rtol=RTOL, atol=ATOL)
    trained = _official(fixture, model, SIMPLENET_KEYS, "trained_")
    # The adaptor's bias shifts every row alike, which the discriminator's train-mode batch norm removes:
    # its gradient is 0 up to float rounding, and Adam's normalised step follows that rounding noise (in
    # the official code too). It and the batch norm's running mean (which sees that shift) are left out;
    # evaluation then runs on the official trained weights.
    _assert_state(model, {key: value for key, value in trained.items()
                          if key not in ("adaptor.0.bias", "discriminator.1.running_mean")})
    _load(model, trained)

    layers = _test_layers(fixture)
    with torch.no_grad():
        result = modeler.evaluate_step({"features": layers})
    np.testing.assert_allclose(result["anomaly_maps"][:, 0].numpy(), fixture["maps"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result["anomaly_scores"].numpy(), fixture["image_scores"], rtol=RTOL, atol=ATOL)


# -- SuperSimpleNet -------------------------------------------------------------------------------------
def _supersimplenet_model() -> SuperSimpleNetModel:
    model = SuperSimpleNetModel("resnet18", layers=(2, 3), pretrained=False, seg_hidden=32)
    model.extractor = _Channels([4, 4])
    width = 8
    model.adaptor = nn.Conv2d(width, width, 1)
    model.segmentation[0] = nn.Conv2d(width, 32, 1)
    model.classification[0] = nn.Conv2d(width + 1, 128, 5, padding=2)
    return model


def test_supersimplenet_upscaled_aggregated_features():
    fixture = _fixture("supersimplenet")
    layers = _test_layers(fixture)
    features = _supersimplenet_model().features(layers)
    np.testing.assert_allclose(features.numpy(), fixture["features_test"], rtol=RTOL, atol=ATOL)


def test_supersimplenet_training_steps_losses_weights_and_evaluation():
    model = _supersimplenet_model()
    fixture, modeler, outputs = _official_steps("supersimplenet", model, SUPERSIMPLENET_KEYS, "initial.", "adamw",
                                                "multistep", ["masks", "noise"])
    for step, output in enumerate(outputs):
        np.testing.assert_allclose(output["map"].detach().numpy(), fixture["train_maps"][step], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(output["score"].detach().numpy(), fixture["train_scores"][step], rtol=RTOL, atol=ATOL)
    # As SimpleNet's adaptor bias: each head's first convolution bias is removed by the train-mode batch norm
    # right after it, so its gradient is float rounding noise that Adam's normalised step follows (it moved
    # beyond 1e-5 with two threads, not with one). It and that batch norm's running mean are left out;
    # evaluation then runs on the official trained weights.
    trained = _official(fixture, model, SUPERSIMPLENET_KEYS, "trained.")
    noise_only = ("segmentation.0.bias", "segmentation.1.running_mean", "classification.0.bias",
                  "classification.1.running_mean")
    _assert_state(model, {key: value for key, value in trained.items() if key not in noise_only})
    _load(model, trained)

    layers = _test_layers(fixture)
    with torch.no_grad():
        result = modeler.evaluate_step({"features": layers})
    np.testing.assert_allclose(result["anomaly_maps"].numpy(), fixture["anomaly_map"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result["anomaly_scores"].numpy(), torch.sigmoid(torch.from_numpy(fixture["score"])).numpy(),
                               rtol=RTOL, atol=ATOL)


class _ReplayedDraws:
    """A numpy Generator stand-in replaying the official torch draws: scale exponents, uniform angle
    draws (ours scale them by 2π as the official code does), and the emptying draw."""

    def __init__(self, fixture: dict) -> None:
        self.exponents = list(fixture["perlin_exponents"].ravel())
        self.uniform = fixture["perlin_uniform"].astype(np.float64)
        self.chances = list(fixture["perlin_chance"])

    def integers(self, low: int, high: int) -> int:
        assert (low, high) == (0, 6)
        return int(self.exponents.pop(0))

    def random(self, shape=None):
        if shape is None:
            return float(self.chances.pop(0))
        count = int(np.prod(shape))
        values, self.uniform = self.uniform[:count], self.uniform[count:]
        return values.reshape(shape)


def test_supersimplenet_perlin_masks_from_the_official_draws():
    fixture = _fixture("supersimplenet")
    rng = _ReplayedDraws(fixture)
    masks = np.stack([perlin_feature_mask(24, 20, 0.2, rng).numpy() for _ in range(len(fixture["perlin_masks"]))])
    assert 0 < fixture["perlin_masks"].sum() < fixture["perlin_masks"].size  # the draws cover both outcomes
    np.testing.assert_array_equal(masks, fixture["perlin_masks"])


def test_defaults_are_the_official_settings():
    """SimpleNet: run.sh and SimpleNet.load at 351a2b8; SuperSimpleNet: train.py's run_unsup (MVTec) at 60d1e74."""
    simplenet = resolve_config({"model.name": "simplenet", "data.name": "mvtec"})
    assert simplenet["model"] | {"backbone": None} == {
        "name": "simplenet", "backbone": None, "layers": [2, 3], "pretrained": True, "weights": None, "patch_size": 3,
        "pre_embed_dim": 1536, "embed_dim": 1536, "adaptor_layers": 1, "discriminator_layers": 2,
        "discriminator_hidden": 1024, "noise_std": 0.015, "margin": 0.5, "sigma": 4.0, "backbone_runtime": "torch"}
    train = simplenet["train"]
    assert (train["epochs"], train["optimizer"], train["lr"], train["weight_decay"], train["adaptor_lr"],
            train["adaptor_weight_decay"], train["scheduler"]) == (40 * 4, "adam", 2e-4, 1e-5, 1e-3 * 0.1, 0.01, "none")
    data = simplenet["data"]
    assert (data["image_size"], round(data["image_size"] / data["crop_ratio"]), data["batch_size"]) == (288, 329, 8)

    supersimplenet = resolve_config({"model.name": "supersimplenet", "data.name": "mvtec"})
    assert supersimplenet["model"] | {"backbone": None} == {
        "name": "supersimplenet", "backbone": None, "layers": [2, 3], "pretrained": True, "weights": None,
        "patch_size": 3, "seg_hidden": 1024, "cls_channels": 128, "cls_kernel": 5, "noise_std": 0.015,
        "perlin_threshold": 0.2, "margin": 0.5, "focal_gamma": 4.0, "stop_grad": True, "sigma": 4.0,
        "backbone_runtime": "torch"}
    train = supersimplenet["train"]
    assert (train["epochs"], train["optimizer"], train["lr"], train["weight_decay"], train["adaptor_lr"],
            train["adaptor_weight_decay"], train["scheduler"], train["milestones"], train["gamma"]) == (
        300, "adamw", 2e-4, 1e-5, 1e-4, 0.01, "multistep", [0.8, 0.9], 0.4)
    data = supersimplenet["data"]
    assert (data["image_size"], data["crop_ratio"], data["batch_size"]) == (256, 1.0, 32)
