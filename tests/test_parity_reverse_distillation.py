"""Parity of Reverse Distillation with hq-deng/RD4AD, stage by stage (tests/fixtures/parity/reverse_distillation.npz,
made by tools/parity/make_fixtures_rd_dfm.py): the official ResNet-18 encoder, OCBE and decoder run with the
seeded weights of tests/parity_inputs.py on its fixed images; ours get the same weights by official name."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_framework.modelers.modeler_reverse_distillation import ReverseDistillationModeler
from anomaly_framework.models.model_reverse_distillation import ReverseDistillationModel
from anomaly_framework.models.reverse_distillation_blocks import ResidualBlock
from parity_inputs import parity_images, seeded_tensors, to_tensor

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "reverse_distillation.npz"
# Our module names -> the official ones (resnet.BN_layer as "bn", de_resnet.ResNet as "decoder").
RENAMES = [(r"^encoder\.model\.", "encoder."), (r"^bottleneck\.level1_down\.0\.", "bn.conv1."),
           (r"^bottleneck\.level1_down\.1\.", "bn.bn1."), (r"^bottleneck\.level1_down\.3\.", "bn.conv2."),
           (r"^bottleneck\.level1_down\.4\.", "bn.bn2."), (r"^bottleneck\.level2_down\.0\.", "bn.conv3."),
           (r"^bottleneck\.level2_down\.1\.", "bn.bn3."), (r"^bottleneck\.embedding\.", "bn.bn_layer."),
           (r"^decoder\.stages\.(\d)\.", lambda m: f"decoder.layer{int(m.group(1)) + 1}."),
           (r"^(bn\..*)\.shortcut\.", r"\1.downsample."), (r"^(decoder\..*)\.shortcut\.", r"\1.upsample.")]


def official_name(name: str) -> str:
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


@pytest.fixture(scope="module")
def fixture() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def load_official_weights(model: ReverseDistillationModel) -> None:
    """The official run's seeded weights: each official module (encoder, ``bn``, decoder) was seeded by its own
    tensor names; the encoder's input map and batch-norm epsilon stay ours (identity, 1e-5)."""
    state = model.state_dict()
    official = {name: official_name(name) for name in state
                if not name.startswith(("encoder.input", "encoder.batchnorm"))}
    for part in ("encoder.", "bn.", "decoder."):
        names = {n: o.removeprefix(part) for n, o in official.items() if o.startswith(part)}
        values = seeded_tensors({o: state[n] for n, o in names.items()})
        state.update({n: values[o] for n, o in names.items()})
    model.load_state_dict(state)


@pytest.fixture(scope="module")
def model() -> ReverseDistillationModel:
    """Our R18 model with the official run's seeded weights."""
    model = ReverseDistillationModel("resnet18", pretrained=False)
    load_official_weights(model)
    return model.eval()


def _images() -> torch.Tensor:
    return to_tensor(parity_images(2, 32)).contiguous()


def _close(ours: torch.Tensor, official: np.ndarray, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(official, dtype=torch.float32)
    torch.testing.assert_close(ours.float(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_source_is_pinned(fixture):
    source = json.loads(str(fixture["source"]))
    assert source["repository"] == "hq-deng/RD4AD" and len(source["commit"]) == 40


@pytest.mark.parametrize("pair", ["shapes_r18", "shapes_wr50"])
def test_ocbe_and_decoder_have_the_official_tensors(fixture, pair):
    bottleneck, decoder = (json.loads(part) for part in str(fixture[pair]).split("\n"))
    expected = {f"bn.{k}": v for k, v in bottleneck.items()} | {f"decoder.{k}": v for k, v in decoder.items()}
    ours = ReverseDistillationModel("resnet18" if pair == "shapes_r18" else "wide_resnet50_2", pretrained=False)
    mapped = {official_name(k): list(v.shape) for k, v in ours.state_dict().items() if not k.startswith("encoder.")}
    assert mapped == expected


def test_every_stage_equals_the_official_one(fixture, model):
    with torch.no_grad():
        outputs = model(_images())
        code = model.bottleneck(outputs["encoder"])
    for level in range(3):
        _close(outputs["encoder"][level], fixture[f"encoder_layer{level + 1}"])
        _close(outputs["decoder"][level], fixture[f"decoder_layer{level + 1}"])
    _close(code, fixture["code"])
    assert float(model.loss(outputs)) == pytest.approx(float(fixture["loss_eval"]), rel=1e-5)


def test_training_loss_uses_batch_statistics_as_the_official_training(fixture, model):
    model = copy.deepcopy(model).train()  # batch-norm running statistics move in training mode
    with torch.no_grad():
        loss = model.loss(model(_images()))
    assert not model.encoder.training and model.bottleneck.training
    assert float(loss) == pytest.approx(float(fixture["loss_train"]), rel=1e-5)


def test_map_and_score_through_the_modeler_equal_the_official_evaluation(fixture, model):
    modeler = ReverseDistillationModeler(model)
    result = modeler.evaluate_step({"image": _images()})
    _close(result["anomaly_maps"][:, 0], fixture["maps"])
    _close(result["anomaly_scores"], fixture["scores"])


@pytest.mark.parametrize("name, upsample, in_channels", [("ocbe_block", False, 48), ("decoder_block", True, 64)])
def test_wide_resnet_bottleneck_blocks_equal_the_official_ones(fixture, name, upsample, in_channels):
    """WR50's OCBE and decoder blocks (1×1, 3×3 or 2×2 transposed, 1×1; width per group 128) at small widths."""
    block = ResidualBlock("bottleneck", in_channels, 8, 2, width_per_group=128, upsample=upsample)
    state = block.state_dict()
    names = {n: n.replace("shortcut.", "upsample." if upsample else "downsample.") for n in state}
    values = seeded_tensors({o: state[n] for n, o in names.items()})
    block.load_state_dict({n: values[o] for n, o in names.items()})
    with torch.no_grad():
        _close(block.eval()(torch.from_numpy(fixture[f"{name}_in"])), fixture[f"{name}_out"])


def test_training_recipe_is_the_official_one():
    """main.train: Adam(lr 0.005, betas (0.5, 0.999)) over the OCBE and decoder only, batch 16, 200 epochs, 256 px."""
    from anomaly_framework.config import resolve_config
    from anomaly_framework.factories import build_model, build_modeler

    config = resolve_config({"model.name": "reverse_distillation", "model.backbone": "resnet18",
                             "model.pretrained": False})
    modeler = build_modeler(config, build_model(config))
    optimizer, scheduler = modeler.configure_optimizers()
    group = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.Adam and scheduler is None
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.005, (0.5, 0.999), 0.0)
    trainable = {id(p) for p in group["params"]}
    assert trainable == {id(p) for p in [*modeler.model.bottleneck.parameters(), *modeler.model.decoder.parameters()]}
    assert (config["data"]["batch_size"], config["train"]["epochs"], config["data"]["image_size"]) == (16, 200, 256)
