"""Every registered model is calibrated out of sample, and its labels, predict's labels and normalised
scores all follow the one stored threshold (issue 24)."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest

from anomaly_framework.inference.predict import predict
from anomaly_framework.main import run_experiment
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.reporting.predictions import normalized_score, score_scale

TINY = {"draem": {"model.reconstructive_width": 4, "model.discriminative_width": 4, "model.score_filter": 3},
        "fastflow": {"model.flow_steps": 2}, "dfm": {"model.pooling_kernel_size": 2},
        "cflow": {"model.coupling_blocks": 2, "model.layers": [1, 2, 3], "model.fiber_batch": 16},
        **{name: {"model.base_channels": 8} for name in ("ae", "unet_ae", "vae", "unet_vae")}}
OUT_OF_SAMPLE = {"held-out train/good", "train/good, leave-one-image-out"}


@pytest.mark.parametrize("name", MODEL_REGISTRY.names())
def test_every_model_calibrates_out_of_sample_and_predict_follows_its_threshold(name, tmp_path, demo_root):
    backbone = {} if name in TINY and name not in ("fastflow", "dfm", "cflow") else {"model.backbone": "resnet18", "model.pretrained": False}
    overrides = {"model.name": name, **backbone, **TINY.get(name, {}), "data.name": "demo", "data.root": str(demo_root),
                 "data.image_size": 32, "data.batch_size": 8, "eval.num_figures": 0, "output_dir": str(tmp_path)}
    if name not in ("padim", "patchcore", "dfm"):  # memory models have no epochs
        overrides["train.epochs"] = 1
    with pytest.warns(UserWarning, match="cannot be certified"):  # the demo's 40 (or 32 held-in) images < 45
        results = run_experiment(overrides)
    metrics = results["metrics"]
    calibration = metrics["threshold_calibration"]
    assert calibration["images"] in OUT_OF_SAMPLE and metrics["pixel_threshold_calibration"]["n"] == calibration["n"]
    assert calibration["n"] == (40 if "leave-one" in calibration["images"] else 8)  # 20 % of 40 held out

    prediction = predict(results["run_dir"], demo_root / "fabric" / "test", overlays=False)
    threshold, scale = metrics["threshold"], metrics["score_scale"]
    with open(Path(results["run_dir"]) / "scores.csv") as handle:
        run_scores = {row["image_path"]: float(row["score"]) for row in csv.DictReader(handle)}
    for row in prediction["rows"]:
        assert row["score"] == pytest.approx(run_scores[row["image_path"]], rel=1e-5, abs=1e-6)
        assert row["label"] == int(row["score"] >= threshold)
        assert row["normalized_score"] == pytest.approx(0.5 * (1 + math.tanh((row["score"] - threshold) / (2 * scale))))
        assert (row["normalized_score"] >= 0.5) == bool(row["label"]) or row["score"] == pytest.approx(threshold)
    labels = np.array([run_scores[row["image_path"]] >= threshold for row in prediction["rows"]])
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == np.array(["good" not in Path(r["image_path"]).parts
                                                                            for r in prediction["rows"]])))


def test_normalised_score_puts_the_threshold_at_one_half_and_the_median_normal_at_one_tenth():
    normal = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    scale = score_scale(8.0, normal)
    assert scale == pytest.approx((8.0 - 3.0) / math.log(9))
    assert normalized_score(8.0, 8.0, scale) == 0.5
    assert normalized_score(3.0, 8.0, scale) == pytest.approx(0.1)
    assert normalized_score(13.0, 8.0, scale) == pytest.approx(0.9)
    assert normalized_score(1e9, 8.0, scale) == 1.0 and normalized_score(-1e9, 8.0, scale) == 0.0
    assert normalized_score(5.0, None, scale) is None


def test_training_on_every_image_calibrates_in_sample_and_says_so(tmp_path, demo_root):
    overrides = {"model.name": "stfpm", "model.backbone": "resnet18", "model.pretrained": False, "data.name": "demo",
                 "data.root": str(demo_root), "data.image_size": 32, "data.batch_size": 8, "data.val_fraction": 0.0,
                 "train.epochs": 1, "train.monitor": "loss", "eval.num_figures": 0, "output_dir": str(tmp_path)}
    with pytest.warns(UserWarning, match="calibrated on the training images themselves"):
        metrics = run_experiment(overrides)["metrics"]
    assert metrics["threshold_calibration"]["images"].startswith("train/good in-sample (biased low")
