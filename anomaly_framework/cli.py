"""The command line: ``python main.py`` (repository root), ``python -m anomaly_framework`` and the installed
``anomaly-framework`` command all run ``main()``.

    python main.py --model padim --dataset mvtec --category bottle --data-root /data/mvtec
    python main.py predict --checkpoint RUN_DIR --input new_images/
    python main.py export --checkpoint RUN_DIR --format onnx

torch, timm, matplotlib and the models are imported inside the functions that use them, so that ``--help``
and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from anomaly_framework.errors import FrameworkError, one_line


def parse_value(text: str):
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def image_size_argument(text: str) -> int | str:
    """``--image-size``: a side in pixels or ``native``."""
    if text == "native":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels or 'native', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and evaluate an anomaly detector.")
    parser.add_argument("--model", help="model name, e.g. padim; a comma list (padim,patchcore) runs a sweep")
    parser.add_argument("--dataset", help="dataset name: demo, mvtec, visa, btad, folder")
    parser.add_argument("--category", help="category of the dataset, e.g. bottle; 'all' or a comma list runs a sweep")
    parser.add_argument("--data-root", help="dataset root folder (else the dataset's environment variable)")
    for key, what in FOLDER_FLAGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", help=f"--dataset folder: {what} (data.{key})")
    parser.add_argument("--backbone", help="timm backbone, e.g. wide_resnet50_2")
    parser.add_argument("--image-size", type=image_size_argument,
                        help="model input side in pixels, or 'native' (each file at its own size; needs data.tile_size)")
    parser.add_argument("--epochs", type=int, help="training epochs (gradient-trained models)")
    parser.add_argument("--batch-size", type=int, help="batch size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--output-dir", help="folder for run outputs (default experiments)")
    parser.add_argument("--resume", help="continue an interrupted gradient-trained run from its folder (last.pt)")
    parser.add_argument("--benchmark", action="store_true",
                        help="also time image loading, the backbone alone and a memory copy, and compare stages")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="a module of yours (importable name or .py path) registering models; repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, dotted (repeatable): --set train.lr=0.1; MODEL:KEY=VALUE sets "
                             "it for that model's runs only: --set patchcore:model.coreset_ratio=0.01")
    parser.add_argument("--seeds", help="comma list of seeds (0,1,2): repeats every run; tables show mean ± std")
    parser.add_argument("--skip-done", action="store_true",
                        help="in a sweep, reuse runs whose resolved config already has results")
    parser.add_argument("--launcher", choices=["local", "submitit", "ray"],
                        help="where a sweep's runs execute: here one after another (local, the default), one SLURM "
                             "job each (submitit) or one Ray task each (ray); settings: --set sweep.KEY=VALUE")
    parser.add_argument("--summarize", metavar="SWEEP_DIR",
                        help="rebuild a sweep's summary from its run folders (also while its jobs run) and print it")
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py predict", description="Score new images with a saved run.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder (or its checkpoint.pt)")
    source.add_argument("--model-file", help="an exported .onnx file, run with onnxruntime alone (see 'main.py export')")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--output-dir", help="where to write (default <run>/predictions/<timestamp>)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-overlays", action="store_true", help="write the CSV only")
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py export", description="Export a saved run for deployment.")
    parser.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.pt)")
    parser.add_argument("--format", required=True, help="onnx, torchscript or openvino")
    parser.add_argument("--output", help="the artifact's path (default <run>/export/model.<format suffix>)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    return parser


def predict_command(args: argparse.Namespace) -> dict:
    """``predict`` with a run (torch) or with an exported ONNX file (onnxruntime only)."""
    if args.model_file:
        from anomaly_framework.deploy.onnx_runner import predict_onnx

        return predict_onnx(args.model_file, args.input, args.output_dir, overlays=not args.no_overlays)
    from anomaly_framework.inference.predict import predict

    return predict(args.checkpoint, args.input, args.output_dir, args.device, overlays=not args.no_overlays)


FOLDER_FLAGS = {"train_dir": "folder of normal training images", "test_normal_dir": "folder of normal test images",
                "test_abnormal_dir": "folder of anomalous test images (sub-folders = defect types)",
                "mask_dir": "optional folder of masks, matched to anomalous images by stem",
                "valid_dir": "optional labelled validation folder with normal/ and abnormal/"}
FLAG_KEYS = {
    "model": "model.name", "dataset": "data.name", "category": "data.category", "data_root": "data.root",
    "backbone": "model.backbone", "image_size": "data.image_size", "epochs": "train.epochs",
    "batch_size": "data.batch_size", "device": "device", "seed": "seed", "output_dir": "output_dir",
    "resume": "train.resume", "launcher": "sweep.launcher", **{key: f"data.{key}" for key in FOLDER_FLAGS},
}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted overrides from the flags; ``--set`` entries come last and win."""
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.plugin:
        overrides["plugins"] = args.plugin
    if any(getattr(args, flag) is not None for flag in FOLDER_FLAGS):
        overrides.setdefault("data.name", "folder")  # the folder flags only mean something there
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FrameworkError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    return overrides


def parse_command(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """("export" | "predict" | "run", args); argparse answers --help and usage errors here, before any
    heavy import."""
    if argv[:1] == ["export"]:
        return "export", build_export_parser().parse_args(argv[1:])
    if argv[:1] == ["predict"]:
        return "predict", build_predict_parser().parse_args(argv[1:])
    return "run", build_parser().parse_args(argv)


def run_command(kind: str, args: argparse.Namespace) -> tuple[str, str | None]:
    """Runs what the command line asks (one run, a sweep, a benchmark, an export or a prediction); returns
    the folder to print last and, when some runs of a sweep failed, the line that says so."""
    if kind == "export":
        from anomaly_framework.deploy.export import export

        return str(export(args.checkpoint, args.format, args.output, force=args.force)), None
    if kind == "predict":
        result = predict_command(args)
        for path, reason in result["skipped"]:
            print(f"skipped: {reason}", file=sys.stderr)
        print(f"{len(result['rows'])} images scored, {len(result['skipped'])} skipped; threshold {result['threshold']}")
        return result["output_dir"], None
    from anomaly_framework.config_overrides import check_scopes, split_scoped
    from anomaly_framework.sweeps.sweep import run_sweep, split_list, summarize_sweep

    if args.summarize:
        return summarize_sweep(args.summarize)
    overrides = overrides_from_args(args)
    models = split_list(args.model) or [overrides.get("model.name", "padim")]
    check_scopes(split_scoped(overrides)[1], models)
    categories = split_list(args.category) or [overrides.get("data.category")]
    seeds = [int(seed) for seed in split_list(args.seeds)] if args.seeds else [overrides.get("seed", 0)]
    cluster = any(key.startswith("sweep.") for key in overrides)  # --launcher: even one run is a job
    if len(models) > 1 or len(categories) > 1 or categories == ["all"] or len(seeds) > 1 or args.skip_done or cluster:
        if args.benchmark:
            raise FrameworkError("--benchmark times one run: give one model, one category and one seed")
        for key in ("model.name", "data.category", "seed"):
            overrides.pop(key, None)
        sweep = run_sweep(overrides, models, categories, seeds, skip_done=args.skip_done)
        failed = sum(row["status"] == "failed" for row in sweep["rows"])
        problem = (f"{failed} of {len(sweep['rows'])} sweep runs failed (their errors are in "
                   f"{Path(sweep['sweep_dir']) / 'runs.csv'})") if failed else None
        return sweep["sweep_dir"], problem
    if args.benchmark:
        from anomaly_framework.benchmarks.floors import run_benchmark

        return run_benchmark(overrides)["run_dir"], None
    from anomaly_framework.main import run_experiment

    return run_experiment(overrides)["run_dir"], None


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 1 when runs of a sweep failed, 2 for a user error, 130 on Ctrl-C."""
    kind, args = parse_command(sys.argv[1:] if argv is None else argv)
    try:
        folder, problem = run_command(kind, args)
    except FrameworkError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's other ranks (their group already left) print nothing
        print(folder)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0
