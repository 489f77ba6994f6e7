"""DRAEM: network shapes and widths, the official init, the focal loss by hand, scoring, and a short run."""
import math

import pytest
import torch

from anomaly_framework.config import resolve_config
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment
from anomaly_framework.models.model_draem import DiscriminativeNetwork, DraemModel, ReconstructiveNetwork, focal_loss
from anomaly_framework.errors import FrameworkError


def test_networks_have_the_official_shapes_and_widths():
    reconstructive = ReconstructiveNetwork(3, base=8)
    images = torch.rand(2, 3, 64, 64)
    assert reconstructive.encoder(images)[-1].shape == (2, 64, 4, 4)  # 8·base at 1/16, no skips
    assert reconstructive(images).shape == (2, 3, 64, 64)
    discriminative = DiscriminativeNetwork(6, base=4)
    features = discriminative.encoder(torch.rand(2, 6, 64, 64))
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 32, 32] and features[-1].shape[-1] == 2  # 1/32
    assert discriminative(torch.rand(2, 6, 64, 64)).shape == (2, 2, 64, 64)
    full = DraemModel(image_size=256)
    counts = [sum(p.numel() for p in net.parameters()) for net in (full.reconstructive, full.discriminative)]
    assert 60e6 < counts[0] < 75e6 and 25e6 < counts[1] < 32e6  # the official 69.0M + 28.8M (97.4M in all)


def test_official_init():
    torch.manual_seed(0)
    model = DraemModel(reconstructive_width=16, discriminative_width=16, image_size=64)
    convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert abs(convs.std().item() - 0.02) < 0.002 and abs(convs.mean().item()) < 0.002
    assert all(torch.all(m.bias == 0) for m in norms)
    assert abs(torch.cat([m.weight for m in norms]).mean().item() - 1.0) < 0.01


def test_focal_loss_against_a_hand_computed_case():
    # Two pixels: p(anomaly) 0.9 on an anomalous pixel, 0.3 on a normal one; γ 2, smoothing 1e-5.
    probabilities = torch.tensor([[0.1, 0.7], [0.9, 0.3]]).view(1, 2, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    s = 1e-5
    p1 = (1 - s) * 0.9 + s * 0.1 + s  # clamped one-hot [s, 1 - s] · p, + smooth
    p2 = (1 - s) * 0.7 + s * 0.3 + s
    expected = (-(1 - p1) ** 2 * math.log(p1) - (1 - p2) ** 2 * math.log(p2)) / 2
    assert focal_loss(probabilities, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    confident = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    assert focal_loss(confident, target).item() < 1e-6


def test_image_score_is_the_maximum_of_the_mean_filtered_map():
    model = DraemModel(reconstructive_width=4, discriminative_width=4, score_filter=3, image_size=32)
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 10, 10] = 9.0  # an isolated peak is spread over the 3×3 window
    maps[0, 0, 20:23, 20:23] = 2.0  # a 3×3 blob keeps its level at its centre
    assert model.image_score(maps).item() == pytest.approx(2.0)


def test_bad_image_size_and_paper_schedule_config():
    with pytest.raises(FrameworkError, match="divisible by 32"):
        DraemModel(image_size=100)
    config = resolve_config({"model.name": "draem", "train.milestones": [0.5715, 0.8572], "train.gamma": 0.1})
    assert [math.floor(f * config["train"]["epochs"]) for f in config["train"]["milestones"]] == [400, 600]
    assert config["data"]["normalize"] == "none" and config["train"]["trainer"] == "classification"


def test_short_draem_training_lowers_the_loss_and_reports_its_scores(tmp_path, demo_root, scores_auroc):
    """Training quality with a margin that holds anywhere: from random init the loss falls about threefold
    in 12 epochs (1.23 → 0.40 here), so a quarter is a safe bound. Detecting the demo defects after so short
    a run is not (image AUROC 0.46 on one machine, 0.6+ on another): the AUROC is checked for being the
    one of the written scores instead, and detection is covered by the parity fixtures of the scoring path."""
    results = run_experiment({
        "model": {"name": "draem", "reconstructive_width": 8, "discriminative_width": 8},
        "data": {"name": "demo", "root": str(demo_root), "image_size": 64, "batch_size": 8},
        "train": {"epochs": 12, "lr": 1e-3},
        "output_dir": str(tmp_path), "eval": {"num_figures": 1},
    })
    history = results["fit"]["history"]
    assert history[-1]["train"]["loss"] < 0.75 * history[0]["train"]["loss"]
    assert {"focal", "l2", "ssim_loss"} <= set(history[-1]["train"])
    assert history[-1]["train"]["l2"] < history[0]["train"]["l2"]
    assert results["metrics"]["image_auroc"] == pytest.approx(scores_auroc(results["run_dir"]), abs=1e-9)
    modeler, checkpoint = load_checkpoint(results["run_dir"])
    assert checkpoint["config"]["model"]["name"] == "draem"
