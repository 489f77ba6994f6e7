"""End-to-end parity of CFlow, SimpleNet and SuperSimpleNet (the pattern of tests/test_parity_end_to_end.py,
whose helpers this module uses): our public scoring path (modeler.evaluate_step; inference.predict from a
saved run on PNG files) against the official whole inference path on the same fixed images and seeded weights.
Fixtures e2e_simplenet.npz / e2e_supersimplenet.npz: tools/parity/make_simplenet_fixtures.py; e2e_cflow.npz:
tools/parity/make_cflow_fixtures.py. docs/parity.md lists what differs on purpose."""
from __future__ import annotations

import numpy as np
import torch

from parity_inputs import parity_images, seeded_tensors, to_tensor
from test_parity_end_to_end import check_outputs, fixture, load_backbone, modeler_for, predict_scores
from test_parity_simplenet import SIMPLENET_KEYS, SUPERSIMPLENET_KEYS


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
