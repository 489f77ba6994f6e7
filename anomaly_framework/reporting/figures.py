"""What a researcher looks at after a run: heat-map panels, the score histogram and training curves (the
score banner of prediction overlays is in the torch-free ``reporting.predictions``, shared with the ONNX runner).

Figures are written at a size meant to be read as written (about 100 px per inch, 11 pt text), so a
panel can be opened and judged without zooming.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from anomaly_framework.reporting.predictions import label_text  # noqa: E402
from anomaly_framework.ops.normalize import denormalize  # noqa: E402
from anomaly_framework.ops.ragged import value_range  # noqa: E402

NORMAL_COLOUR, ANOMALY_COLOUR = "#1f77b4", "#d62728"
DPI = 100
# PNG written at zlib level 1: lossless as the default 6, a few % larger, 0.1 s less per figure (1500×430 px).
SAVE_OPTIONS = {"dpi": DPI, "pil_kwargs": {"compress_level": 1}}


def verdict(score: float, threshold: float | None) -> str:
    """``predicted anomalous`` / ``predicted normal`` at ``score >= threshold``, or that there is no threshold."""
    if threshold is None:
        return "no threshold"
    return f"predicted {label_text(int(score >= threshold))} (threshold {threshold:.4g})"


def save_sample_figures(run_dir: Path, predictions, dataset, threshold: float | None, pixel_threshold: float | None,
                        count: int) -> list[Path]:
    """``figures/<index>_<type>.png`` for a spread of test images: image | ground truth | heat map with its
    colour bar | map >= ``pixel_threshold``, titled with the image's label, score and the label predicted
    at the image ``threshold``.

    The colour scale is shared by every panel of the run, so two panels' colours can be compared: from the
    test maps' minimum to twice the pixel threshold's distance above it, which puts the threshold in the
    middle of the colour bar (marked) and keeps one outlying image from turning every other map blue;
    values above the scale are drawn at its top colour. Without a pixel threshold: the maps' maximum.
    ``dataset[i]["image"]`` gives back image ``i`` of ``predictions``.
    """
    folder = Path(run_dir) / "figures"
    folder.mkdir(exist_ok=True)
    total = len(predictions.scores)
    indices = np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(int)) if count > 0 else []
    low, high = value_range(predictions.maps)  # native size: a list of maps of their own sizes
    if pixel_threshold is not None and pixel_threshold > low:
        high = 2 * pixel_threshold - low
    normalize = getattr(dataset, "normalize", "imagenet")
    paths = []
    for index in indices:
        image = dataset[int(index)]["image"].unsqueeze(0)
        rgb = denormalize(image, normalize)[0].permute(1, 2, 0).numpy()
        anomaly_map = predictions.maps[index][0]
        heat = torch.nn.functional.interpolate(anomaly_map[None, None], size=rgb.shape[:2], mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        score, label = float(predictions.scores[index]), int(predictions.labels[index])
        figure, axes = plt.subplots(1, 4, figsize=(15, 4.3), gridspec_kw={"width_ratios": [1, 1, 1.08, 1]})
        axes[0].imshow(rgb)
        axes[0].set_title(Path(predictions.image_paths[index]).name, fontsize=11)
        axes[1].imshow(predictions.masks[index][0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title("ground truth (anomaly_mask)", fontsize=11)
        axes[2].imshow(rgb)
        shown = axes[2].imshow(heat, cmap="jet", alpha=0.5, vmin=low, vmax=high)
        axes[2].set_title("anomaly map", fontsize=11)
        colour_bar = figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.03, extend="max")
        colour_bar.ax.tick_params(labelsize=9)
        if pixel_threshold is not None:
            colour_bar.ax.axhline(pixel_threshold, color="black", linewidth=2)
        predicted = heat >= pixel_threshold if pixel_threshold is not None else np.zeros_like(heat, dtype=bool)
        axes[3].imshow(predicted, cmap="gray", vmin=0, vmax=1)
        axes[3].set_title(f"map >= pixel threshold {pixel_threshold:.4g}" if pixel_threshold is not None
                          else "no pixel threshold", fontsize=11)
        for axis in axes:
            axis.axis("off")
        figure.suptitle(f"{predictions.defect_types[index]}: label {label_text(label)}, image score {score:.4g}, "
                        f"{verdict(score, threshold)}", fontsize=12, color=ANOMALY_COLOUR if label else "black")
        figure.tight_layout()
        path = folder / f"{index:04d}_{predictions.defect_types[index]}.png"
        figure.savefig(path, **SAVE_OPTIONS)
        plt.close(figure)
        paths.append(path)
    return paths


def save_score_histogram(path: Path, labels: np.ndarray, anomaly_scores: np.ndarray, threshold: float | None,
                         threshold_source: str, separation: float | None) -> Path:
    """Normal and anomalous test scores on shared bins, the threshold and where it came from, and the
    separation (metrics_base.separation) in the title."""
    labels = np.asarray(labels).astype(bool)
    anomaly_scores = np.asarray(anomaly_scores, dtype=np.float64)
    normal_mask, anomaly_mask = ~labels, labels
    edges = np.histogram_bin_edges(anomaly_scores, bins=min(40, max(10, int(math.sqrt(len(anomaly_scores))) * 2)))
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.hist(anomaly_scores[normal_mask], bins=edges, color=NORMAL_COLOUR, alpha=0.6,
              label=f"normal ({int(normal_mask.sum())})")
    axis.hist(anomaly_scores[anomaly_mask], bins=edges, color=ANOMALY_COLOUR, alpha=0.6,
              label=f"anomalous ({int(anomaly_mask.sum())})")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.4g}")
    axis.set_xlabel("image anomaly score", fontsize=11)
    axis.set_ylabel("test images", fontsize=11)
    gap = f"{separation:.2f}" if separation is not None else "n/a (a class has fewer than 2 images)"
    axis.set_title(f"Test scores: separation (Cohen's d) = {gap}", fontsize=12)
    axis.legend(fontsize=10)
    source = "\n".join(textwrap.wrap(f"threshold source: {threshold_source}", 95))
    figure.text(0.01, 0.01, source, fontsize=9, va="bottom")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, **SAVE_OPTIONS)
    plt.close(figure)
    return path


def save_training_curves(path: Path, rows: list[dict]) -> Path | None:
    """One panel per logged quantity of history.csv rows (train and valid curves together), learning rate
    last; None when there is nothing to draw."""
    if not rows:
        return None
    epochs = [row["epoch"] for row in rows]
    names: list[str] = []
    for row in rows:
        for key in row:
            name = key.split("_", 1)[1] if key.startswith(("train_", "valid_")) else key
            if key not in ("epoch", "seconds") and name not in names:
                names.append(name)
    columns = min(3, len(names))
    figure, axes = plt.subplots(math.ceil(len(names) / columns), columns, squeeze=False,
                                figsize=(5 * columns, 3.6 * math.ceil(len(names) / columns)))
    for axis, name in zip(axes.flat, names):
        for split, colour in (("train", NORMAL_COLOUR), ("valid", "#ff7f0e"), (None, "black")):
            key = f"{split}_{name}" if split else name
            values = [row.get(key) for row in rows]
            if any(value is not None and value != "" for value in values):
                axis.plot(epochs, [np.nan if value in (None, "") else float(value) for value in values],
                          marker="o", markersize=3, color=colour, label=split or name)
        axis.set_title("learning rate" if name == "lr" else name, fontsize=11)
        axis.set_xlabel("epoch", fontsize=10)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "lr":
            axis.set_yscale("log")
        axis.legend(fontsize=9)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, **SAVE_OPTIONS)
    plt.close(figure)
    return path
