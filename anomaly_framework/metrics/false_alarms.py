"""Thresholds from a false-alarm budget, certified by the distribution of order statistics.

Given n scores of normal images the model was not fitted on, and a new normal image exchangeable with
them (same distribution, continuous scores), the threshold t = X₍ₖ₎ (the k-th smallest calibration
score; ``score >= t`` is anomalous) has false-alarm rate FAR = 1 − F(X₍ₖ₎), and F(X₍ₖ₎) is the k-th
order statistic of n uniforms: FAR ~ Beta(n + 1 − k, k) whatever F is (distribution-free; the
tolerance-limit argument of Wilks 1941, the split-conformal bound). We take the smallest k (the
lowest threshold, the most recall) with P(FAR ≤ budget) ≥ confidence. Even k = n (the maximum)
certifies only budgets ≥ 1 − (1 − confidence)^(1/n); below that the maximum is used and a warning
says which budget n images can certify and how many images the asked one needs.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from anomaly_framework.errors import FrameworkError


def smallest_certifiable_budget(count: int, confidence: float) -> float:
    """The lowest budget the maximum of ``count`` normal scores meets with probability ``confidence``:
    P(FAR of the maximum ≤ a) = 1 − (1 − a)^n ≥ c  ⇔  a ≥ 1 − (1 − c)^(1/n)."""
    return 1.0 - (1.0 - confidence) ** (1.0 / count)


def images_needed(budget: float, confidence: float) -> int:
    """The fewest normal images whose maximum meets ``budget`` at ``confidence``: n ≥ log(1 − c) / log(1 − a)."""
    return math.ceil(math.log1p(-confidence) / math.log1p(-budget) - 1e-12)


def budget_threshold(normal_scores: np.ndarray, budget: float, confidence: float, what: str = "image") -> tuple[float, dict]:
    """The lowest order statistic of ``normal_scores`` whose false-alarm rate is ≤ ``budget`` with
    probability ≥ ``confidence``, and the record of how it was chosen (for results.json).

    The record holds the budget, the estimator, n, the rank k, the expected false-alarm rate
    (n + 1 − k)/(n + 1) and its central interval at ``confidence``, and whether the budget is certified.
    """
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    count = scores.size
    if count == 0 or not np.isfinite(scores).all():
        raise FrameworkError("A false-alarm-budget threshold needs finite scores of at least one normal image")
    ranks = np.arange(1, count + 1)
    meets = stats.beta.cdf(budget, count + 1 - ranks, ranks) >= confidence
    certified = bool(meets.any())
    rank = int(ranks[meets][0]) if certified else count
    if not certified:
        warnings.warn(f"eval.false_alarm_rate={budget} cannot be certified at confidence {confidence} with {count} "
                      f"normal calibration images ({what} threshold): their maximum is used, whose false-alarm rate "
                      f"is ≤ {smallest_certifiable_budget(count, confidence):.3g} at that confidence; the budget needs "
                      f"≥ {images_needed(budget, confidence)} images")
    far = stats.beta(count + 1 - rank, rank)
    record = {
        "false_alarm_rate": budget,
        "confidence": confidence,
        "estimator": f"order statistic: the {rank}-th smallest of {count} out-of-sample normal scores, "
                     f"P(false-alarm rate <= budget) >= confidence (FAR ~ Beta(n+1-k, k), distribution-free)",
        "n": count,
        "rank": rank,
        "certified": certified,
        "smallest_certifiable_false_alarm_rate": smallest_certifiable_budget(count, confidence),
        "expected_false_alarm_rate": (count + 1 - rank) / (count + 1),
        "false_alarm_rate_interval": [float(far.ppf((1 - confidence) / 2)), float(far.ppf((1 + confidence) / 2))],
        "false_alarm_rate_bound": float(far.ppf(confidence)),
    }
    return float(scores[rank - 1]), record
