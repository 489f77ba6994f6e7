"""End-to-end parity of CFlow, SimpleNet and SuperSimpleNet (the pattern of tests/test_parity_end_to_end.py,
whose helpers this module uses): our public scoring path (modeler.evaluate_step; inference.predict from a
saved run on PNG files) against the official whole inference path on the same fixed images and seeded weights.
Fixtures e2e_simplenet.npz / e2e_supersimplenet.npz: tools/parity/make_simplenet_fixtures.py; e2e_cflow.npz:
tools/parity/make_cflow_fixtures.py. docs/parity.md lists what differs on purpose."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parity_inputs import parity_images, seeded_flow_tensors, seeded_tensors, to_tensor
from test_parity_end_to_end import check_outputs, fixture, load_backbone, modeler_for, our_preprocessing, predict_scores
from test_parity_simplenet import SIMPLENET_KEYS, SUPERSIMPLENET_KEYS

MAP_ATOL = 2e-6  # CFlow: its maps are 0 where the summed probability map peaks


def load_official_heads(model: torch.nn.Module, keys: dict[str, str]) -> None:
    """The seeded head values the official model carried, drawn per official tensor name (``keys``: our
    prefix -> the official one)."""
    state = model.state_dict()
    official = {their + name[len(ours):]: name for name in state for ours, their in keys.items()
                if name.startswith(ours + ".")}
    values = seeded_tensors({their: state[name] for their, name in official.items()})
    model.load_state_dict({official[their]: value for their, value in values.items()}, strict=False)


def seeded_modeler(name: str, keys: dict[str, str], **model: object):
    """Our ``name`` on a resnet18 (layer2 + layer3) with the official run's seeded backbone and heads."""
    modeler = modeler_for(name, 64, backbone="resnet18", pretrained=False, **model)
    load_backbone(modeler.model.extractor)
    load_official_heads(modeler.model, keys)
    modeler.model.train()  # evaluate_step must put it in eval mode
    return modeler


def test_simplenet_end_to_end_equals_official_predict(tmp_path):
    """DonaldRR/SimpleNet's ``_predict`` (pretrain / target width 48, discriminator 2 × 32): map = −score
    bilinearly upsampled, scipy gaussian_filter σ 4; image score = max patch score. rtol 1e-5 (the official
    smoothing runs in float64 on float32 maps: measured below 1e-6)."""
    official = fixture("simplenet")
    modeler = seeded_modeler("simplenet", SIMPLENET_KEYS, pre_embed_dim=48, embed_dim=48, discriminator_hidden=32)
    images = parity_images(4, 64, seed=9)
    with torch.no_grad():
        outputs = modeler.evaluate_step(to_tensor(images))
    check_outputs(outputs, official["maps"], official["scores"], rtol=1e-5)
    scores = predict_scores(modeler, images, tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-5)


def test_supersimplenet_end_to_end_equals_official_forward(tmp_path):
    """blaz-r/SuperSimpleNet's eval-mode forward (segmentation head 32 wide, its classification head as
    official): map = segmentation logits bilinearly upsampled and Gaussian-blurred (torchvision, σ 4);
    image score = sigmoid of the classification logit, as its train.test stores it. Map: rtol 1e-5, and abs
    2e-5 where its logits cross 0 (values up to 12; float32 sums of 384 channels in another order, measured
    1.4e-5). Scores: rtol 1e-4 (measured 2.2e-5, image 0): the logit sums 258 pooled values of a 5×5
    convolution over 385 channels, and perturbing the features by 1e-6 of their maximum (float32 rounding)
    moves that score by 1e-5 to 5e-5 relative even in float64."""
    official = fixture("supersimplenet")
    modeler = seeded_modeler("supersimplenet", SUPERSIMPLENET_KEYS, seg_hidden=32)
    images = parity_images(4, 64, seed=10)
    with torch.no_grad():
        outputs = modeler.evaluate_step(to_tensor(images))
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), official["maps"], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), official["scores"], rtol=1e-4, atol=0)
    scores = predict_scores(modeler, images, tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-4)


def cflow_modeler(official: dict):
    """Our CFlow (resnet18, layers 2–4, reflection padding, 8 blocks, condition 8) with the official run's
    seeded encoder and decoders (FrEIA names ``decoders.<level>.module_list.<block>.<name>``)."""
    from test_parity_cflow import load_freia_state

    modeler = modeler_for("cflow", 64, backbone="resnet18", pretrained=False, condition_dim=8)
    load_backbone(modeler.model.extractor)
    for level, (flow, layout) in enumerate(zip(modeler.model.flows, json.loads(str(official["decoder_layout"])))):
        shapes = {f"decoders.{level}.{name}": torch.empty(shape) for name, shape in layout.items()}
        values = seeded_flow_tensors(shapes)
        load_freia_state(flow, {name[len(f"decoders.{level}."):]: value for name, value in values.items()})
    return modeler


def test_cflow_end_to_end_equals_official_train_test_path(tmp_path):
    """gudovskiy/cflow-ad's train.train (training skipped) on 4 images: test_meta_epoch's log-likelihoods per
    level, and the map and scores it hands to roc_auc_score. Comparable as is: the log-likelihoods and
    ``CflowModel.anomaly_map`` on the batch (the official normalisation by the test set's maxima). Our run
    path (evaluate_step, predict) normalises by fitted per-level maxima and shifts by the number of levels
    (the documented deviation, docs/models.md): given the official test-set maxima as fitted values, its maps
    and scores are the official ones plus the constant 3 − max(summed map). rtol 1e-5 throughout, abs 2e-6
    on maps (a map is 0 where the summed map peaks; the official one is computed in float64, ours in
    float32: measured 1.2e-6)."""
    official = fixture("cflow")
    modeler = cflow_modeler(official)
    assert official["maps"].std() > 0.1  # the seeded decoders give maps that vary (not one peak)
    images = parity_images(4, 64, seed=11)
    with torch.no_grad():
        outputs = modeler.model.eval()(to_tensor(images))
        for level, log_prob in enumerate(outputs["log_prob"]):
            np.testing.assert_allclose(log_prob.flatten().numpy(), official[f"log_prob{level}"], rtol=1e-5)
        batch_maps = modeler.model.anomaly_map(outputs, (64, 64))[:, 0].numpy()
        np.testing.assert_allclose(batch_maps, official["maps"], rtol=1e-5, atol=MAP_ATOL)
        np.testing.assert_allclose(batch_maps.reshape(4, -1).max(1), official["scores"], rtol=1e-5, atol=MAP_ATOL)
        modeler.model.log_prob_max.copy_(torch.tensor([float(official[f"log_prob{level}"].max()) for level in range(3)]))
        modeler.model.train()  # evaluate_step must put it in eval mode
        shift = 3.0 - float(official["total_max"])
        check_outputs_shifted(modeler.evaluate_step(to_tensor(images)), official, shift)
    scores = predict_scores(modeler, images, tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"] + shift, rtol=1e-5, atol=MAP_ATOL)


def check_outputs_shifted(outputs: dict, official: dict, shift: float) -> None:
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), official["maps"] + shift, rtol=1e-5, atol=MAP_ATOL)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), official["scores"] + shift, rtol=1e-5, atol=MAP_ATOL)


@pytest.mark.parametrize("name", ["simplenet", "cflow"])
def test_preprocessing_equals_the_official_dataset(name, tmp_path):
    """Our folder dataset with the model's default data config against the official dataset class on the
    same PNG files (320 px): SimpleNet's datasets.mvtec (run.sh: bilinear resize 329, centre crop 288),
    CFlow's custom_datasets MVTecDataset (LANCZOS resize to 256 × 256, no crop); both ToTensor + ImageNet
    normalisation. Every 9th pixel and the sums over all pixels, to float32 rounding. (SuperSimpleNet's
    datamodule is anomalib / albumentations code the parity virtualenv does not run: not compared.)"""
    official = fixture(name)
    ours = our_preprocessing(name, tmp_path)
    assert tuple(ours.shape) == tuple(official["preprocessing_shape"])
    np.testing.assert_allclose(ours[:, :, ::9, ::9].float().numpy(), official["preprocessing_grid"], rtol=1e-6, atol=1e-6)
    assert ours.sum().item() == pytest.approx(float(official["preprocessing_sum"]), rel=1e-6)
    assert ours.square().sum().item() == pytest.approx(float(official["preprocessing_sum_squares"]), rel=1e-6)
