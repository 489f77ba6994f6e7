"""Official PaDiM / PatchCore code and ours on one real MVTec AD category, same backbone weights.

The official code runs unchanged on its own dataset class (its preprocessing) with one substitution: its
torchvision backbone is replaced by our frozen timm extractor (``--backbone``, EfficientNet-Lite0 here,
whose weights are the only real ones on this machine), exposed under the layer names the official code
hooks. Ours runs through ``run_experiment`` with the same backbone, layers and protocol (PaDiM: all
channels, as the official random subset cannot index a 176-channel embedding; PatchCore: the official
``max`` image score). Prints per-image score correlations and differences (PatchCore: our Euclidean
scores squared, as faiss scores) and image / pixel AUROC side by side.

    python tools/parity/end_to_end.py padim --official DIR --data-root /work/data --category bottle
    python tools/parity/end_to_end.py patchcore --official DIR --data-root /work/data --category bottle
    python tools/parity/end_to_end.py patchcore --official DIR --coreset-ratio 1.0 --official-batchnorm-pass

``--official-batchnorm-pass`` runs ours with ``model.official_batchnorm_pass=true`` (the official code's
batch-norm side effect replayed); with the whole bank (``--coreset-ratio 1.0``) nothing random is left, so
the two should then agree per image to float rounding.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from anomaly_framework.main import run_experiment  # noqa: E402
from anomaly_framework.backbones.extractors import TimmFeatureExtractor  # noqa: E402
from make_fixtures import _import  # noqa: E402  (the same loader of an official checkout's files)


class HookableBackbone(nn.Module):
    """Our extractor's stages under the attribute names the official code registers forward hooks on."""

    def __init__(self, backbone: str, layers: list[int], names: list[str]) -> None:
        super().__init__()
        self.extractor = TimmFeatureExtractor(backbone, layers, pretrained=True)
        # As a torchvision model fresh from its constructor: in training mode and following train()/eval(),
        # so the official code's own mode switches (and PatchCore's train-mode feature_dimensions() pass,
        # which moves batch-norm statistics) act on it as on its usual backbone.
        self.extractor.frozen = False
        self.extractor.train()
        self.names = names
        for name in names:
            setattr(self, name, nn.Sequential(nn.Identity()))

    def forward(self, images: torch.Tensor):
        return [getattr(self, name)(feature) for name, feature in zip(self.names, self.extractor(images))]


def official_padim(checkout: Path, data_root: Path, category: str, backbone: str) -> dict:
    """main.main() with its resnet18 replaced by the hookable backbone and all channels kept."""
    from PIL import Image

    Image.ANTIALIAS = Image.LANCZOS  # removed in Pillow 10; the same filter
    main = _import(checkout / "main.py", "padim_official_main")
    stub = HookableBackbone(backbone, [1, 2, 3], ["layer1", "layer2", "layer3"])
    channels = sum(stub.extractor.channels)
    main.resnet18 = lambda pretrained, progress: stub
    main.sample = lambda population, k: list(range(channels))  # every channel, in order (ours: the same)
    main.mvtec.CLASS_NAMES = [category]
    captured: dict = {}
    real_auc = main.roc_auc_score
    main.roc_auc_score = lambda y, s: captured.setdefault("auc", []).append(real_auc(y, s)) or captured["auc"][-1]
    main.plot_fig = lambda test_img, scores, gts, *rest: captured.update(scores=scores.copy())
    real_dataset = main.mvtec.MVTecDataset

    def dataset(root, class_name, is_train):
        built = real_dataset(root, class_name=class_name, is_train=is_train)
        if not is_train:
            captured["paths"] = list(built.x)
        return built

    main.mvtec.MVTecDataset = dataset
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["main.py", "--data_path", str(data_root), "--save_path", tmp, "--arch", "resnet18"]
        main.main()
    image_scores = captured["scores"].reshape(len(captured["scores"]), -1).max(1)
    return {"paths": captured["paths"], "scores": image_scores, "image_auroc": captured["auc"][0],
            "pixel_auroc": captured["auc"][1]}


def official_patchcore(checkout: Path, data_root: Path, category: str, backbone: str, coreset_ratio: float) -> dict:
    """PatchCore.load/fit/predict as bin/run_patchcore.py configures it (IM224: resize 256, crop 224,
    layer2+3, 1024/1024, patch 3, approximate greedy coreset 10 %, faiss exact 1-NN)."""
    sys.path.insert(0, str(checkout / "src"))
    import patchcore.common
    import patchcore.datasets.mvtec as mvtec
    import patchcore.patchcore
    import patchcore.sampler

    torch.manual_seed(0)
    np.random.seed(0)
    device = torch.device("cpu")
    stub = HookableBackbone(backbone, [2, 3], ["layer2", "layer3"])
    model = patchcore.patchcore.PatchCore(device)
    model.load(stub, ["layer2", "layer3"], device, (3, 224, 224), 1024, 1024, patchsize=3,
               featuresampler=(patchcore.sampler.IdentitySampler() if coreset_ratio >= 1.0
                               else patchcore.sampler.ApproximateGreedyCoresetSampler(coreset_ratio, device)),
               nn_method=patchcore.common.FaissNN(False, 2))
    train = mvtec.MVTecDataset(str(data_root), classname=category, resize=256, imagesize=224,
                               split=mvtec.DatasetSplit.TRAIN)
    test = mvtec.MVTecDataset(str(data_root), classname=category, resize=256, imagesize=224,
                              split=mvtec.DatasetSplit.TEST)
    model.fit(torch.utils.data.DataLoader(train, batch_size=8))
    scores, maps, labels, masks = model.predict(torch.utils.data.DataLoader(test, batch_size=8))
    masks = np.asarray(masks).astype(bool).ravel()
    return {"paths": [row[2] for row in test.data_to_iterate], "scores": np.asarray(scores),
            "image_auroc": roc_auc_score(labels, scores), "pixel_auroc": roc_auc_score(masks, np.asarray(maps).ravel())}


def ours(model: str, data_root: Path, category: str, backbone: str, output: Path, coreset_ratio: float,
         batchnorm_pass: bool) -> dict:
    overrides = {"padim": {"layers": [1, 2, 3], "n_features": None},
                 "patchcore": {"layers": [2, 3], "score_mode": "max", "coreset_ratio": coreset_ratio,
                               "official_batchnorm_pass": batchnorm_pass}}[model]
    results = run_experiment({
        "model": {"name": model, "backbone": backbone, **overrides},
        "data": {"name": "mvtec", "root": str(data_root), "category": category},
        "output_dir": str(output),
        # No threshold pass: the comparison needs scores and AUROCs only.
        "eval": {"num_figures": 0, "threshold_strategy": "manual", "threshold_value": 0.0},
    })
    with open(Path(results["run_dir"]) / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {"paths": [row["image_path"] for row in rows], "scores": np.array([float(r["score"]) for r in rows]),
            "image_auroc": results["metrics"]["image_auroc"], "pixel_auroc": results["metrics"]["pixel_auroc"]}


def _key(path: str) -> str:
    """defect_type/file name: the same image in both test lists."""
    parts = Path(path).parts
    return f"{parts[-2]}/{parts[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["padim", "patchcore"])
    parser.add_argument("--official", type=Path, required=True, help="checkout of the official repository")
    parser.add_argument("--data-root", type=Path, default=Path("/work/data"))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "parity_end_to_end")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore: 1.0 = the whole bank on both sides")
    parser.add_argument("--official-batchnorm-pass", action="store_true",
                        help="PatchCore: ours replays the official batch-norm side effect")
    args = parser.parse_args()
    if args.model == "padim":
        official = official_padim(args.official.resolve(), args.data_root.resolve(), args.category, args.backbone)
    else:
        official = official_patchcore(args.official.resolve(), args.data_root.resolve(), args.category, args.backbone,
                                      args.coreset_ratio)
    mine = ours(args.model, args.data_root.resolve(), args.category, args.backbone, args.output, args.coreset_ratio,
                args.official_batchnorm_pass)
    theirs = dict(zip(map(_key, official["paths"]), official["scores"]))
    keys = [_key(p) for p in mine["paths"]]
    paired = np.array([[s, theirs[k]] for k, s in zip(keys, mine["scores"])])
    if args.model == "patchcore":  # the official scores are faiss's squared L2 distances, ours Euclidean
        paired[:, 0] = paired[:, 0] ** 2
    summary = {
        "model": args.model, "backbone": args.backbone, "category": args.category, "images": len(paired),
        "pearson": float(pearsonr(paired[:, 0], paired[:, 1])[0]),
        "median_relative_difference": float(np.median(np.abs(paired[:, 0] - paired[:, 1]) / np.abs(paired[:, 1]))),
        "max_relative_difference": float(np.max(np.abs(paired[:, 0] - paired[:, 1]) / np.abs(paired[:, 1]))),
        "spearman": float(spearmanr(paired[:, 0], paired[:, 1])[0]),
        "official": {"image_auroc": official["image_auroc"], "pixel_auroc": official["pixel_auroc"]},
        "ours": {"image_auroc": mine["image_auroc"], "pixel_auroc": mine["pixel_auroc"]},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
