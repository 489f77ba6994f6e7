"""Thresholds from a false-alarm budget: the order statistic against scipy's binomial and simulation,
the warning for too few images, the config's refusals and what results.json records."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from anomaly_framework.errors import FrameworkError
from anomaly_framework.main import run_experiment
from anomaly_framework.metrics.false_alarms import budget_threshold, images_needed, smallest_certifiable_budget


@pytest.mark.parametrize("count, budget, confidence", [(209, 0.05, 0.9), (60, 0.05, 0.95), (1000, 0.01, 0.9)])
def test_rank_is_the_lowest_whose_false_alarm_rate_meets_the_budget(count, budget, confidence):
    """Reference: X(k) >= F⁻¹(1 − a) iff fewer than k of n uniforms fall below 1 − a, a binomial count."""
    scores = np.random.default_rng(0).normal(size=count)
    threshold, record = budget_threshold(scores, budget, confidence)
    meets = [k for k in range(1, count + 1) if stats.binom.cdf(k - 1, count, 1 - budget) >= confidence]
    assert record["rank"] == meets[0] and record["certified"]
    assert threshold == np.sort(scores)[meets[0] - 1]
    assert record["expected_false_alarm_rate"] == (count + 1 - meets[0]) / (count + 1)
    assert record["false_alarm_rate_bound"] <= budget
    assert record["n"] == count


def test_budget_holds_with_the_stated_confidence_over_simulated_calibration_sets():
    """Exponential scores: the true false-alarm rate of threshold t is exp(−t); over 4,000 calibration sets of
    50 images the share meeting a 5 % budget equals the Beta probability the estimator computed."""
    rng = np.random.default_rng(1)
    count, budget, confidence, trials = 50, 0.05, 0.9, 4000
    outcomes, probability = [], None
    for _ in range(trials):
        threshold, record = budget_threshold(rng.exponential(size=count), budget, confidence)
        outcomes.append(math.exp(-threshold) <= budget)
        probability = stats.beta.cdf(budget, count + 1 - record["rank"], record["rank"])
    spread = math.sqrt(probability * (1 - probability) / trials)
    assert abs(np.mean(outcomes) - probability) < 4 * spread
    assert probability >= confidence


def test_too_few_images_warn_and_use_the_maximum():
    scores = np.arange(8.0)
    with pytest.warns(UserWarning, match=r"cannot be certified .* ≤ 0.25 .* needs ≥ 45 images"):
        threshold, record = budget_threshold(scores, 0.05, 0.9)
    assert threshold == 7.0 and record["rank"] == 8 and not record["certified"]
    assert record["smallest_certifiable_false_alarm_rate"] == pytest.approx(1 - 0.1 ** (1 / 8))
    assert 1 - (1 - smallest_certifiable_budget(8, 0.9)) ** 8 == pytest.approx(0.9)
    assert images_needed(0.05, 0.9) == 45 and 1 - 0.95 ** 44 < 0.9 <= 1 - 0.95 ** 45


@pytest.mark.parametrize("key, value", [("false_alarm_rate", 0.0), ("false_alarm_rate", 1.0), ("false_alarm_confidence", 1.5)])
def test_config_refuses_a_budget_outside_the_open_unit_interval(tmp_path, demo_root, key, value):
    config = {"data": {"name": "demo", "root": str(demo_root)}, "output_dir": str(tmp_path), "eval": {key: value}}
    with pytest.raises(FrameworkError, match=f"eval.{key}' must be in \\(0, 1\\)"):
        run_experiment(config)
    assert not any(tmp_path.rglob("checkpoint.pt"))


def test_default_threshold_records_budget_estimator_and_expected_rate(tmp_path, demo_root):
    config = {"model": {"name": "padim", "backbone": "resnet18", "pretrained": False},
              "data": {"name": "demo", "root": str(demo_root), "image_size": 32},
              "output_dir": str(tmp_path), "eval": {"num_figures": 0, "save_checkpoint": False}}
    with pytest.warns(UserWarning, match="cannot be certified"):  # 40 training images < 45
        results = run_experiment(config)
    metrics = json.loads((next(tmp_path.rglob("results.json"))).read_text())["metrics"]
    record = metrics["threshold_calibration"]
    assert metrics["threshold_strategy"] == "false_alarm_rate" == results["metrics"]["threshold_strategy"]
    assert (record["false_alarm_rate"], record["confidence"], record["n"], record["rank"]) == (0.05, 0.9, 40, 40)
    assert record["images"] == "train/good, leave-one-image-out" and "order statistic" in record["estimator"]
    assert record["expected_false_alarm_rate"] == pytest.approx(1 / 41)
    low, high = record["false_alarm_rate_interval"]
    assert (low, high) == pytest.approx((stats.beta.ppf(0.05, 1, 40), stats.beta.ppf(0.95, 1, 40)))
    assert metrics["pixel_threshold_calibration"]["n"] == 40
