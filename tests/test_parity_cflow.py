"""CFlow-AD against the official code (gudovskiy/cflow-ad b2ebf9e; tools/parity/make_cflow_fixtures.py):
positional encoding, encoder, conditional flow, loss, learning rates, one meta-epoch of training (fiber
batches, per-level optimiser steps) and the test-time map and scores, each at rel. 1e-5."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anomaly_framework.config import resolve_config
from anomaly_framework.factories import build_model, build_modeler
from anomaly_framework.models.model_cflow import conditional_flow, positional_encoding_2d
from anomaly_framework.modelers.modeler_cflow import MetaEpochSchedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from make_cflow_fixtures import BLOCKS, CONDITION, CROP, LEVELS, sine_fill_  # noqa: E402

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "parity" / "cflow.npz")
RTOL = 1e-5
CLAMP = resolve_config({"model.name": "cflow"})["model"]["clamp"]  # the default (official 1.9)


def test_fixture_names_the_pinned_commit():
    source = json.loads(str(FIXTURE["source"]))
    assert source["repository"] == "gudovskiy/cflow-ad"
    assert source["commit"] == "b2ebf9e673a0aa46992a3b18367ec066a57bba89"


@pytest.mark.parametrize("shape", [(16, 3, 5), (128, 2, 3)])
def test_positional_encoding_equals_official(shape):
    expected = FIXTURE["pe_{}_{}_{}".format(*shape)]
    np.testing.assert_allclose(positional_encoding_2d(*shape).numpy(), expected, rtol=RTOL, atol=1e-7)


def cflow_modeler(backbone: str = "resnet18", **overrides):
    config = resolve_config({"model.name": "cflow", "model.backbone": backbone, "model.pretrained": False,
                             "device": "cpu", "data.image_size": 48, **overrides})
    return build_modeler(config, build_model(config))


def test_encoder_is_the_official_reflection_padded_resnet_at_layers_2_to_4():
    model = cflow_modeler(**{"model.coupling_blocks": 1}).model
    sine_fill_(model.extractor.model)
    features = model.extract(torch.from_numpy(FIXTURE["encoder_image"]).float())
    for level, feature in enumerate(features):
        np.testing.assert_allclose(feature.numpy(), FIXTURE[f"encoder_feature{level}"], rtol=RTOL, atol=1e-6)


def freia_state(key: str) -> dict[str, torch.Tensor]:
    """A FrEIA SequenceINN state the fixture packed as one vector and its layout (name, size)."""
    sizes = json.loads(str(FIXTURE[f"{key}_layout"]))
    parts = np.split(FIXTURE[key], np.cumsum([size for _, size in sizes])[:-1])
    return {name: torch.from_numpy(part).float() for (name, _), part in zip(sizes, parts)}


def load_freia(flow: nn.Module, key: str) -> None:
    """The fixture's FrEIA state ``key`` into our flow."""
    load_freia_state(flow, freia_state(key))


def load_freia_state(flow: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """FrEIA parameters (names ``module_list.<k>.<name>``) into our flow; sizes agree, shapes differ
    only by the 1×1 trailing dimensions of our convolutions and per-channel parameters."""
    with torch.no_grad():
        for k, block in enumerate(flow.blocks):
            ours = {"subnet.0.weight": block.subnet[0].weight, "subnet.0.bias": block.subnet[0].bias,
                    "subnet.2.weight": block.subnet[2].weight, "subnet.2.bias": block.subnet[2].bias,
                    "global_scale": block.global_scale, "global_offset": block.global_offset, "w_perm": block.rotation}
            for name, target in ours.items():
                if f"module_list.{k}.{name}" in state:
                    target.copy_(state[f"module_list.{k}.{name}"].view(target.shape))


def test_conditional_flow_and_loss_equal_freia_cflow_head():
    flow = conditional_flow(7, BLOCKS, CLAMP, CONDITION)
    load_freia(flow, "flow")
    fibers, conditions = (torch.from_numpy(FIXTURE[key]).float() for key in ("flow_fibers", "flow_conditions"))
    z, log_det = flow(fibers, conditions, per_position=True)
    np.testing.assert_allclose(z.detach().numpy(), FIXTURE["flow_z"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(log_det.detach().numpy(), FIXTURE["flow_log_det"], rtol=RTOL, atol=1e-6)
    model = cflow_modeler(**{"model.coupling_blocks": 1}).model
    model.flows = nn.ModuleList([flow])
    log_prob = model.level_log_prob(0, fibers, conditions)
    np.testing.assert_allclose(log_prob.detach().numpy(), FIXTURE["flow_log_prob"], rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(model.fiber_loss(log_prob).mean().item(), FIXTURE["flow_loss"], rtol=RTOL)


def test_learning_rate_schedule_equals_official():
    batches = int(FIXTURE["lr_batches"])
    schedule = MetaEpochSchedule(torch.optim.Adam([nn.Parameter(torch.zeros(1))]), 2e-4, 200, 8, 2)
    schedule.batches_per_epoch = batches
    ours = []
    for epoch in range(200):
        for _ in range(batches):
            schedule.batch_step()
            ours.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.step()
    np.testing.assert_allclose(ours, FIXTURE["lr_rates"], rtol=1e-12)


def stub_modeler(state: str):
    """Our modeler with flows for the stub levels, loaded from the official decoders (``initial`` or
    ``trained``; the trained ones keep their initial permutations, which training never changes)."""
    modeler = cflow_modeler(**{"model.coupling_blocks": 1, "model.condition_dim": CONDITION,
                               "train.epochs": 1, "train.sub_epochs": 1, "data.batch_size": 2})
    model = modeler.model
    model.flows = nn.ModuleList([conditional_flow(c, BLOCKS, CLAMP, CONDITION, level) for level, (c, _) in enumerate(LEVELS)])
    model.register_buffer("log_prob_max", torch.zeros(len(LEVELS)))
    for level, flow in enumerate(model.flows):
        load_freia(flow, f"initial{level}")
        if state == "trained":
            load_freia(flow, f"trained{level}")
    return modeler


def features(split: str, rows) -> list[torch.Tensor]:
    return [torch.from_numpy(FIXTURE[f"{split}_feature{level}"]).float()[rows] for level in range(len(LEVELS))]


def test_one_meta_epoch_of_fiber_training_equals_official_train(monkeypatch):
    """Same initial weights, image batches in the official order, the permutations it drew: our
    training steps (fiber batches of 256 per level, Adam, warm-up rate) give its trained weights."""
    modeler = stub_modeler("initial")
    optimizer, schedule = modeler.configure_optimizers()
    order = FIXTURE["train_batch_order"]
    modeler.set_epoch_length(len(order) // 2)
    sizes = FIXTURE["train_perm_sizes"][1:]  # the first drew the DataLoader's shuffle (order above)
    perms = np.split(FIXTURE["train_perms"][FIXTURE["train_perm_sizes"][0]:].astype(np.int64), np.cumsum(sizes)[:-1])
    replay = iter(torch.from_numpy(perm) for perm in perms)
    monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: next(replay))
    for start in range(0, len(order), 2):
        modeler.training_step({"features": features("train", order[start:start + 2])}, optimizer)
    assert next(replay, None) is None
    expected = stub_modeler("trained").model.flows.state_dict()
    for name, value in modeler.model.flows.state_dict().items():
        np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_test_time_log_likelihoods_map_and_scores_equal_official():
    model = stub_modeler("trained").model.eval()
    outputs = model(features("test", slice(None)))
    for level, log_prob in enumerate(outputs["log_prob"]):
        np.testing.assert_allclose(log_prob.detach().flatten().numpy(), FIXTURE[f"test_log_prob{level}"], rtol=RTOL,
                                   atol=1e-6)
    maps = model.anomaly_map(outputs, (CROP, CROP)).detach()
    np.testing.assert_allclose(maps[:, 0].numpy(), FIXTURE["test_map"], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(maps.amax(dim=(1, 2, 3)).numpy(), FIXTURE["test_scores"], rtol=RTOL)


def test_run_maps_use_the_fitted_maxima_so_an_image_scores_the_same_alone_or_in_a_batch():
    modeler = stub_modeler("trained")
    modeler.model.log_prob_max.copy_(torch.tensor([-1.0, -1.5, -2.0]))
    together = modeler.evaluate_step({"features": features("test", slice(None)), "image": torch.zeros(3, 3, CROP, CROP)})
    alone = modeler.evaluate_step({"features": features("test", slice(1, 2)), "image": torch.zeros(1, 3, CROP, CROP)})
    torch.testing.assert_close(alone["anomaly_maps"], together["anomaly_maps"][1:2], rtol=1e-6, atol=1e-6)
    outputs = modeler.model(features("test", slice(None)))
    expected = 3.0 - sum(torch.nn.functional.interpolate(torch.exp(p - m)[:, None], size=(CROP, CROP), mode="bilinear",
                                                         align_corners=True)
                         for p, m in zip(outputs["log_prob"], (-1.0, -1.5, -2.0)))
    torch.testing.assert_close(together["anomaly_maps"], expected.detach(), rtol=1e-6, atol=1e-6)
