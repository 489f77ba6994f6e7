"""Evaluation metrics against scikit-learn and a brute-force AU-PRO."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomaly_framework.metrics.metrics_base import (
    aupro,
    auroc,
    average_precision,
    compute_image_metrics,
    compute_pixel_metrics,
    f1_max,
    normal_threshold,
    threshold_metrics,
)
from anomaly_framework.errors import FrameworkError


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_aupr_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding creates many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_pixel_metrics_match_sklearn_on_maps():
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 32, 32), dtype=np.uint8)
    masks[1:4, 8:16, 10:20] = 1
    maps = rng.random((6, 32, 32)).astype(np.float32) + masks * 0.5
    for maps in (maps, np.round(maps, 1)):  # distinct scores, then ties (one shared sort serves all three)
        result = compute_pixel_metrics(masks, maps)
        assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
        assert result["pixel_aupr"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
        assert result["aupro"] == aupro(masks, maps)  # its own sort


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    best, threshold = f1_max(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold_metrics(labels, scores, threshold)["f1"] == pytest.approx(best, abs=1e-12)


def test_threshold_metrics_hand_case():
    result = threshold_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], 0.5)
    assert result == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert normal_threshold(np.array([1.0, 3.0, 2.0]), 1.0) == 3.0


def _brute_force_aupro(masks, maps, limit=0.3, steps=4000):
    """Explicit thresholds, explicit regions: the official definition written the slow way."""
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image_index, labelled == k) for k in range(1, count + 1)]
    negatives = ~masks.astype(bool)
    fprs, pros = [], []
    for threshold in np.linspace(maps.max() + 1e-6, maps.min() - 1e-6, steps):
        predicted = maps >= threshold
        fprs.append((predicted & negatives).sum() / negatives.sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    fpr_at = np.r_[fprs[keep], limit]
    pro_at = np.r_[pros[keep], np.interp(limit, fprs, pros)]
    return np.trapezoid(pro_at, fpr_at) / limit


def test_aupro_matches_brute_force_with_diagonal_regions():
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 10:12, 10:18] = True
    masks[1, [3, 4, 5], [3, 4, 5]] = True  # one 8-connected diagonal region, three 4-connected ones
    masks[2, 15:19, 1:3] = True  # image 3 stays good: its pixels count as negatives too
    maps = rng.random(masks.shape).astype(np.float32) * 0.8 + masks * rng.random(masks.shape) * 0.6
    maps = np.round(maps, 2)  # ties between pixels
    assert aupro(masks, maps) == pytest.approx(_brute_force_aupro(masks, maps), abs=2e-3)


def test_aupro_weighs_every_region_equally_whatever_its_size():
    """A 4-pixel and a 1-pixel region; only one of them scores above every negative pixel. Each region
    weighs 1/2, so the PRO curve sits at 0.5 over the whole FPR range either way (pixel weighting would
    give 0.8 and 0.2)."""
    masks = np.zeros((2, 3, 7), dtype=bool)  # image 2 is good: its pixels are negatives too
    masks[0, 0:2, 0:2] = True
    masks[0, 1, 6] = True
    negatives = np.linspace(0.2, 0.8, int((~masks).sum()))
    for big, small in ((0.9, 0.1), (0.1, 0.9)):
        maps = np.zeros(masks.shape, dtype=np.float32)
        maps[~masks] = negatives
        maps[0, 0:2, 0:2], maps[0, 1, 6] = big, small
        for limit in (0.3, 1.0):
            assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(0.5, abs=1e-6)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_image_metrics_keys_and_degenerate_inputs():
    metrics = compute_image_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], 0.5, "test")
    assert metrics["image_auroc"] == 1.0 and metrics["accuracy"] == 1.0
    assert compute_image_metrics([0, 1], [0.1, 0.9], None, "none")["f1"] is None
    with pytest.raises(FrameworkError, match="both normal and anomalous"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(FrameworkError, match="NaN"):
        auroc([0, 1], [np.nan, 0.2])
    with pytest.raises(FrameworkError, match="region"):
        aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
