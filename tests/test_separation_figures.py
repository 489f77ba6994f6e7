"""The separation of normal and anomalous scores (against a hand computation, in results.json, the console
and sweep tables) and the figures a researcher reads: score histogram, heat-map panels, predict overlays."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_framework.reporting.predictions import banner
from anomaly_framework.main import run_experiment
from anomaly_framework.metrics.metrics_base import separation
from anomaly_framework.inference.predict import predict
from anomaly_framework.sweeps.summary import markdown_table


def test_separation_equals_a_hand_computation():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 5.0, 9.0])
    # normal: mean 2, sample variance 1; anomalous: mean 7, sample variance 8; spread sqrt((1 + 8) / 2).
    assert separation(labels, scores) == pytest.approx(5 / math.sqrt(4.5), rel=1e-12)
    assert separation(1 - labels, scores) == pytest.approx(-5 / math.sqrt(4.5), rel=1e-12)  # below normal: negative
    assert separation(np.array([0, 0, 1]), np.array([1.0, 2.0, 3.0])) is None  # one anomalous image: no spread
    assert separation(np.array([0, 0, 1, 1]), np.array([1.0, 1.0, 2.0, 2.0])) is None  # both spreads zero


@pytest.fixture(scope="module")
def padim_run(tmp_path_factory, demo_root):
    output = tmp_path_factory.mktemp("runs")
    return run_experiment({"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                           "data.name": "demo", "data.root": str(demo_root), "data.image_size": 64,
                           "eval.num_figures": 2, "output_dir": str(output)})


def test_results_json_and_console_report_the_separation_of_the_run_scores(padim_run, capsys):
    run_dir = Path(padim_run["run_dir"])
    with open(run_dir / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    normal = np.array([float(r["score"]) for r in rows if r["label"] == "0"])
    anomalous = np.array([float(r["score"]) for r in rows if r["label"] == "1"])
    by_hand = (anomalous.mean() - normal.mean()) / math.sqrt((normal.var(ddof=1) + anomalous.var(ddof=1)) / 2)
    saved = json.loads((run_dir / "results.json").read_text())["metrics"]["separation"]
    assert saved == pytest.approx(by_hand, rel=1e-6)
    from anomaly_framework.utils import show_results

    show_results(padim_run)
    assert f"separation (Cohen's d)  {saved:.4f}" in capsys.readouterr().out


def test_sweep_table_has_a_separation_column():
    entry = {"model": "padim", "category": "fabric", "seeds": 2, "failed": 0}
    for metric, mean, std in (("image_auroc", 0.9, 0.01), ("pixel_auroc", 0.8, 0.0), ("aupro", 0.7, 0.0),
                              ("separation", 3.25, 0.5)):
        entry.update({f"{metric}_mean": mean, f"{metric}_std": std})
    table = markdown_table([entry], ["padim"], ["fabric"]).splitlines()
    assert table[0].endswith("| padim separation |")
    assert table[2].endswith("| 3.2500 ± 0.5000 |") and table[3].endswith("| 3.2500 |")


def test_run_figures_are_written_at_a_readable_size(padim_run):
    run_dir = Path(padim_run["run_dir"])
    assert Image.open(run_dir / "score_histogram.png").size == (800, 500)
    panels = sorted((run_dir / "figures").glob("*.png"))
    assert len(panels) == 2 and all(Image.open(path).size == (1500, 430) for path in panels)


def test_banner_writes_the_text_on_a_band_and_keeps_the_size():
    image = Image.fromarray(np.full((100, 560, 3), 128, np.uint8))
    for anomalous, colour in ((True, (255, 90, 90)), (False, (120, 230, 120))):
        framed = np.asarray(banner(image, ["score 3.2: anomalous (threshold 2.9)"], anomalous))
        band = 20 * 18 // 10  # letters 560 // 28 = 20 px high, a band 1.8 times that
        assert framed.shape == (100, 560, 3)
        assert np.array_equal(framed[band:], np.asarray(image)[band:])  # below the band: the image untouched
        assert (framed[:band, -1] == round(128 * 0.25 + 20 * 0.75)).all()  # the band darkens what it covers
        assert (framed[:band] == colour).all(axis=-1).any()  # the text is drawn in the label's colour
    small = Image.fromarray(np.full((70, 90, 3), 128, np.uint8))
    long, short = banner(small, ["score 16.22: anomalous (threshold 2.64)"], True), banner(small, ["x" * 99, "ok"], True)
    # Band pixels are 47; antialiased letters are brighter. One text that cannot fit is cut at the right
    # edge, a shorter one that fits is chosen when offered.
    assert np.asarray(long)[:16, -4:].max() > 100 and np.asarray(short)[:16, -4:].max() <= 47


def test_predict_overlays_carry_score_and_label_within_the_width(padim_run, demo_root, tmp_path):
    image = sorted((demo_root / "fabric" / "test" / "good").glob("*.png"))[0]
    result = predict(padim_run["run_dir"], image, tmp_path / "predicted")
    overlay = np.asarray(Image.open(tmp_path / "predicted" / f"{image.stem}_overlay.png").convert("RGB"))
    assert overlay.shape[1::-1] == Image.open(image).size  # still the image's own resolution
    colour = (255, 90, 90) if result["rows"][0]["label"] else (120, 230, 120)
    band = overlay[: int(max(12, overlay.shape[1] // 28) * 1.8)]  # the band is at most this high
    assert (band == colour).all(axis=-1).any()  # drawn in the predicted label's colour...
    assert band[:, -4:].max() <= 79  # ...within the width (band pixels are at most 0.25 * 255 + 15)
