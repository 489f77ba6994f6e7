"""CFlow-AD beyond the parity fixtures: the conditional flow's inverse, fiber steps, the epoch maximum,
the rotation's effect on the feature cache, the schedule's resume, and one-line config errors."""
from __future__ import annotations

import pytest
import torch

from anomaly_framework.config import resolve_config
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.models.model_cflow import conditional_flow
from anomaly_framework.modelers.modeler_cflow import MetaEpochSchedule


def cflow(tmp_path=None, demo_root=None, **overrides):
    config = resolve_config({"model.name": "cflow", "model.backbone": "resnet18", "model.pretrained": False,
                             "model.coupling_blocks": 2, "model.condition_dim": 8, "device": "cpu", "data.image_size": 64,
                             **({"data.root": str(demo_root), "output_dir": str(tmp_path)} if demo_root else {}),
                             **overrides})
    return config, build_modeler(config, build_model(config))


def test_conditional_flow_inverts_exactly_and_fibers_equal_maps():
    torch.manual_seed(0)
    flow = conditional_flow(7, 3, 1.9, 8)
    for block in flow.blocks:
        torch.nn.init.normal_(block.subnet[2].weight, std=0.3)
    x, condition = torch.randn(2, 7, 3, 4), torch.randn(2, 8, 3, 4)
    z, log_det = flow(x, condition, per_position=True)
    torch.testing.assert_close(flow.inverse(z, condition), x, rtol=1e-5, atol=1e-5)
    fibers = x.permute(0, 2, 3, 1).reshape(-1, 7)
    z_fibers, log_det_fibers = flow(fibers, condition.permute(0, 2, 3, 1).reshape(-1, 8), per_position=True)
    torch.testing.assert_close(z_fibers, z.permute(0, 2, 3, 1).reshape(-1, 7), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_det_fibers, log_det.flatten(), rtol=1e-5, atol=1e-6)
    # the log-determinant is the one of the Jacobian (brute force on one fiber)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], condition[:1, :, 0, 0], per_position=True)[0][0],
                                                  fibers[0])
    torch.testing.assert_close(torch.linalg.slogdet(jacobian)[1], log_det_fibers[0].detach(), rtol=1e-4, atol=1e-5)


def test_a_training_step_takes_one_optimiser_step_per_full_fiber_batch_and_tracks_the_epoch_maximum():
    _, modeler = cflow(**{"model.fiber_batch": 6})
    optimizer, _ = modeler.configure_optimizers(1)
    steps = []
    original_step = optimizer.step
    optimizer.step = lambda *args, **kwargs: steps.append(1) or original_step(*args, **kwargs)
    features = modeler.model.extract(torch.randn(2, 3, 64, 64))  # 8×8, 4×4, 2×2 per image
    seen = []
    original_log_prob = modeler.model.level_log_prob

    def recording(level, fibers, conditions):
        seen.append((level, len(fibers), original_log_prob(level, fibers, conditions)))
        return seen[-1][2]

    modeler.model.level_log_prob = recording
    modeler.training_step({"features": features}, optimizer)
    assert len(steps) == 128 // 6 + 32 // 6 + 8 // 6  # the remainder of each level left out
    assert all(count == 6 for _, count, _ in seen)
    for level in range(3):
        expected = max(float(out.detach().max()) for lvl, _, out in seen if lvl == level)
        assert modeler.model.log_prob_max[level].item() == pytest.approx(expected)


def test_too_few_fibers_for_one_batch_is_one_line():
    _, modeler = cflow(**{"model.fiber_batch": 256})
    optimizer, _ = modeler.configure_optimizers(1)
    features = modeler.model.extract(torch.randn(1, 3, 64, 64))
    with pytest.raises(FrameworkError, match="model.fiber_batch=256"):
        modeler.training_step({"features": features}, optimizer)


@pytest.mark.parametrize("degrees, cached", [(5.0, False), (0.0, True)])
def test_rotated_training_images_are_never_taken_from_the_feature_cache(tmp_path, demo_root, degrees, cached):
    config, modeler = cflow(tmp_path, demo_root, **{"model.rotation_degrees": degrees, "data.name": "demo"})
    dataloader = build_dataloader(config)
    trainer = build_trainer(config, modeler, dataloader, tmp_path, torch.device("cpu"))
    batch = next(iter(trainer.train_loader()))
    assert ("features" in batch) is cached and ("image" in batch) is not cached


def test_the_rotation_fills_with_normalised_black_and_a_zero_angle_keeps_the_image():
    _, modeler = cflow(**{"model.rotation_degrees": 45.0})
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    angles = torch.empty(4).uniform_(-45.0, 45.0)  # the draws augment makes after the same seed
    torch.manual_seed(0)
    rotated = modeler.model.augment(images)
    black = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    turned = angles.abs() >= 5  # the corner pixel then comes from outside the image
    assert turned.any()
    torch.testing.assert_close(rotated[turned][:, :, 0, 0], black.expand(int(turned.sum()), 3))
    modeler.model.rotation_degrees = 1e-6
    torch.testing.assert_close(modeler.model.augment(images), images)


def test_the_schedule_resumes_at_its_epoch():
    parameter = torch.nn.Parameter(torch.zeros(1))
    first = MetaEpochSchedule(torch.optim.Adam([parameter]), 2e-4, 40, 4, 2)
    for _ in range(13):
        first.step()
    second = MetaEpochSchedule(torch.optim.Adam([parameter]), 2e-4, 40, 4, 2)
    second.load_state_dict(first.state_dict())
    assert second.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"] == first.cosine(3)


@pytest.mark.parametrize("overrides, message", [
    ({"train.sub_epochs": 0}, "train.sub_epochs' must be at least 1"),
    ({"model.fiber_batch": 0}, "model.fiber_batch' must be at least 1"),
    ({"model.condition_dim": 6}, "model.condition_dim' must be a multiple of 4"),
])
def test_bad_cflow_settings_are_one_line_errors(overrides, message):
    with pytest.raises(FrameworkError, match=message):
        cflow(**overrides)


def test_defaults_are_the_official_settings():
    """gudovskiy/cflow-ad b2ebf9e: config.py (enc-arch, pool-layers, coupling-blocks, input-size, batch-size,
    lr, meta-epochs, sub-epochs), main.py (clamp_alpha, condition_vec, lr_warm_epochs), train.py (N),
    custom_datasets/loader.py (Resize(ANTIALIAS) without crop, RandomRotation(5))."""
    config = resolve_config({"model.name": "cflow"})
    model, train, data = config["model"], config["train"], config["data"]
    assert (model["backbone"], model["layers"], model["coupling_blocks"], model["clamp"], model["condition_dim"],
            model["fiber_batch"], model["rotation_degrees"]) == ("wide_resnet50_2.tv_in1k", [2, 3, 4], 8, 1.9, 128, 256, 5.0)
    assert (train["optimizer"], train["lr"], train["weight_decay"], train["epochs"], train["sub_epochs"],
            train["warmup_meta_epochs"], train["scheduler"], train["keep"]) == ("adam", 2e-4, 0.0, 200, 8, 2, "cflow", "last")
    assert (data["image_size"], data["crop_ratio"], data["interpolation"], data["batch_size"]) == (256, 1.0, "lanczos", 32)
