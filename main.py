"""Entry point: ``run_experiment(config)`` for notebooks and the command line alike.

    python main.py --model padim --dataset mvtec --category bottle --data-root /data/mvtec

Each run writes ``<output_dir>/<dataset>/<category>/<model>/<timestamp>/`` with config.json,
results.json, scores.csv, checkpoint.pt, roc_curve.png and figures/.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

# torch, timm, matplotlib and the models are imported inside the functions that use them, so that
# `python main.py --help` and argument errors answer at once.
if TYPE_CHECKING:
    import torch


def make_run_dir(config: dict) -> Path:
    """A new folder per run; never reuses one, even for two runs started in the same second."""
    from anomaly_framework.deploy_onnx import DeploymentError, new_output_dir
    from anomaly_framework.utils import FrameworkError

    data = config["data"]
    parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / config["model"]["name"]
    try:
        return new_output_dir(parent)
    except DeploymentError as error:
        raise FrameworkError(f"{error} (output_dir '{config['output_dir']}'); choose another --output-dir") from error


def backbone_facts(model: torch.nn.Module, config: dict) -> dict:
    """Backbone name, weight source and whether it was pretrained, for results.json."""
    from anomaly_framework.models.model_base import weights_record

    model_cfg = config["model"]
    return {
        "backbone": model_cfg.get("backbone", "none"),
        **weights_record(model),
        "pretrained": bool(model_cfg.get("pretrained", False)),
    }


def run_experiment(config: dict | None = None) -> dict:
    """Resolves ``config``, fits the model, evaluates it on the test split and writes the run folder.

    Args:
        config: overrides of the defaults, nested (``{"model": {"name": "padim"}}``) or dotted
            (``{"model.name": "padim", "data.category": "bottle"}``).

    Returns:
        results.json's content plus ``config`` (the resolved config). Under ``torchrun`` every rank helps
        to fit, rank 0 alone evaluates and writes; the other ranks return their fit summary only.
    """
    import torch

    from anomaly_framework.config import resolve_config
    from anomaly_framework.distributed import init_from_env
    from anomaly_framework.interrupts import ctrl_c_stops_at_next_batch
    from anomaly_framework.utils import resolve_device, seed_everything

    start = time.perf_counter()
    config = resolve_config(config)
    seed_everything(config["seed"])
    device, started_group = init_from_env(resolve_device(config["device"]))
    try:
        with ctrl_c_stops_at_next_batch():
            results = _run(config, device, start)
        return results
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _run(config: dict, device: torch.device, start: float) -> dict:
    import torch

    from anomaly_framework.distributed import broadcast_object, is_main
    from anomaly_framework.models.model_base import check_image_size
    from anomaly_framework.registry import build_dataloader, build_model, build_modeler, build_trainer
    from anomaly_framework.utils import RunInterrupted, show_data_info, show_model_info, show_train_info, write_status

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataloader = build_dataloader(config)
    model = build_model(config)
    check_image_size(model, config["data"]["image_size"])
    modeler = build_modeler(config, model)
    run_dir = Path(broadcast_object(str(make_run_dir(config)) if is_main() else None))
    trainer = None
    try:
        if is_main():
            write_status(run_dir, "running")
            (run_dir / "config.json").write_text(json.dumps(config, indent=2))
            show_data_info(dataloader.info())
            show_model_info(model, backbone_facts(model, config))
            show_train_info(config, device, run_dir)
        trainer = build_trainer(config, modeler, dataloader, run_dir, device)
        results = _fit_and_evaluate(config, trainer, model, device, start)
    except KeyboardInterrupt:
        message = interruption_message(trainer, run_dir)
        if is_main():
            write_status(run_dir, "interrupted", message=message)
        raise RunInterrupted(message) from None
    except Exception as error:
        if is_main():
            write_status(run_dir, "failed", error=one_line(error))
        error.run_dir = str(run_dir)  # where the failed run's record lies (a sweep's runs.csv names it)
        raise
    if is_main():
        write_status(run_dir, "done")
    return results


def interruption_message(trainer, run_dir: Path) -> str:
    """Where an interrupted run stopped and how to go on from there."""
    where = trainer.progress() if trainer is not None else "before training started"
    if trainer is not None and trainer.resumable():
        return f"run interrupted {where}; continue it with the same options plus --resume {run_dir}"
    return f"run interrupted {where}; nothing to resume for this model: run it again"


def _fit_and_evaluate(config: dict, trainer, model, device, start: float) -> dict:
    """Fit, evaluation and every output file of one run (rank 0 alone evaluates and writes)."""
    from anomaly_framework.distributed import is_main, rank, world_size
    from anomaly_framework.figures import save_sample_figures, save_score_histogram
    from anomaly_framework.trainers.trainer_base import describe_resolution
    from anomaly_framework.utils import library_versions, peak_memory_mb, save_roc_curve, save_scores_csv, show_results

    run_dir = trainer.run_dir
    fit_summary = trainer.fit()
    if not is_main():
        return {"rank": rank(), "fit": fit_summary, "run_dir": str(run_dir), "config": config}
    metrics, predictions = trainer.evaluate()
    dataloader = trainer.dataloader
    if config["eval"]["save_checkpoint"]:
        trainer.save_checkpoint()
    save_sample_figures(run_dir, predictions, dataloader.test_dataset, trainer.threshold, trainer.pixel_threshold,
                        config["eval"]["num_figures"])
    save_scores_csv(run_dir, predictions)
    save_roc_curve(run_dir, predictions.labels.numpy(), predictions.scores.numpy(), metrics.get("image_auroc"))
    save_score_histogram(run_dir / "score_histogram.png", predictions.labels.numpy(), predictions.scores.numpy(),
                         trainer.threshold, trainer.threshold_source, metrics.get("separation"))

    timings = {key: round(value, 4) for key, value in trainer.timings.items()}
    timings["total"] = round(time.perf_counter() - start, 4)
    results = {
        "metrics": metrics,
        "timings": timings,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        **backbone_facts(model, config),
        "mask_size": config["data"]["mask_size"] or config["data"]["image_size"],
        "pixel_resolution": describe_resolution(config["data"]),
        "fit": fit_summary,
        "versions": library_versions(),
        "world_size": world_size(),
        "run_dir": str(run_dir),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    trainer.finish(checkpoint_saved=config["eval"]["save_checkpoint"])
    show_results(results)
    return {**results, "config": config}


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """Rebuilds the modeler of a run from its checkpoint alone (no backbone download needed).

    Returns the modeler (on ``device``, in eval mode) and the checkpoint dict (config, threshold...).
    """
    from anomaly_framework.registry import build_model, build_modeler, load_plugins
    from anomaly_framework.trainers.trainer_base import CHECKPOINT_NAME, read_checkpoint
    from anomaly_framework.utils import FrameworkError, resolve_device

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FrameworkError(f"Checkpoint '{path}' not found (give a run folder or its checkpoint.pt)")
    checkpoint = read_checkpoint(path, "cpu", needs=("model", "config", "threshold"))
    config = copy.deepcopy(checkpoint["config"])
    load_plugins(config.get("plugins", []))  # a plugin model is rebuilt by its own module
    if "pretrained" in config["model"]:
        config["model"]["pretrained"] = False  # every weight is in the checkpoint
    modeler = build_modeler(config, build_model(config))
    modeler.load_state_dict(checkpoint["model"], source=str(path))
    modeler.to(resolve_device(device)).model.eval()
    return modeler, checkpoint


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of a plain large-array copy on this machine: the floor a memory-bound loop can reach."""
    import torch

    source = torch.ones(megabytes * 2**18)
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    return source.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Float32 matrix-product rate on this device: the floor of a brute-force search built on matrix products."""
    import torch

    left, right = torch.randn(2 * size, size, device=device), torch.randn(size, 2 * size, device=device)
    with torch.inference_mode():
        left @ right  # warm-up: thread pool and kernel selection
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            left @ right
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * (2 * size) * size * (2 * size) * repeats / (time.perf_counter() - start) / 1e9


def search_arithmetic_tflop(run_dir: str, fit: dict, test_images: int, image_size: int) -> float | None:
    """2 · test patches · bank entries · dimension: the work of the brute-force exact nearest-neighbour
    search (the official one) over the test split, for models with a memory bank (None for the others)."""
    import torch

    if "bank_patches" not in fit:
        return None
    modeler, _ = load_checkpoint(run_dir)  # the patch grid per image, from the fitted model itself
    with torch.inference_mode():
        _, height, width, _ = modeler.model.embed(torch.zeros(1, 3, image_size, image_size)).shape
    return 2 * test_images * height * width * fit["bank_patches"] * fit["bank_dim"] / 1e12


def backbone_floor(config: dict) -> dict:
    """Image loading and backbone-only forward time over the train and test images of a run."""
    import torch

    from anomaly_framework.models.model_base import TimmFeatureExtractor
    from anomaly_framework.registry import build_dataloader, build_model
    from anomaly_framework.utils import resolve_device

    device = resolve_device(config["device"])
    dataloader = build_dataloader(config)
    extractor = next(m for m in build_model(config).modules() if isinstance(m, TimmFeatureExtractor)).to(device)
    loaders = [dataloader.train_loader(shuffle=False), dataloader.test_loader()]
    start = time.perf_counter()
    batches = [batch["image"] for loader in loaders for batch in loader]
    loading = time.perf_counter() - start
    with torch.inference_mode():
        extractor(batches[0].to(device))  # warm-up: allocator and kernel selection
        start = time.perf_counter()
        for images in batches:
            extractor(images.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {"image_loading": loading, "backbone_forward": time.perf_counter() - start,
            "images": sum(len(images) for images in batches), "test_images": len(dataloader.test_dataset)}


def run_benchmark(config: dict | None = None) -> dict:
    """Runs one experiment and sets its stage timings beside the floors measured on the same machine."""
    from anomaly_framework.config import resolve_config
    from anomaly_framework.utils import FrameworkError, resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FrameworkError("--benchmark times a single process against single-process floors: run it without torchrun")
    resolved = resolve_config(config)
    floor = backbone_floor(resolved)
    copy_gbs = copy_bandwidth_gbs()
    gflops = matmul_gflops(resolve_device(resolved["device"]))
    results = run_experiment(config)
    timings = results["timings"]
    coreset = timings.get("fit_coreset", 0.0)
    except_coreset = timings["fit"] - coreset + timings["evaluate"]
    report = {
        "images": floor["images"],
        "image_loading_s": floor["image_loading"],
        "backbone_forward_s": floor["backbone_forward"],
        "fit_s": timings["fit"], "fit_features_s": timings.get("fit_features"), "fit_coreset_s": coreset,
        "evaluate_s": timings["evaluate"], "evaluate_features_s": timings.get("evaluate_features"),
        "evaluate_search_s": timings.get("evaluate_search"), "evaluate_maps_s": timings.get("evaluate_maps"),
        "evaluate_metrics_s": timings.get("evaluate_metrics"), "threshold_s": timings.get("threshold"),
        "all_but_coreset_over_backbone": except_coreset / floor["backbone_forward"],
        "all_but_coreset_over_loading_plus_backbone": except_coreset / (floor["backbone_forward"] + floor["image_loading"]),
        "images_per_second": timings["images_per_second"],
        "peak_memory_mb": results["peak_memory_mb"],
        "copy_gb_per_s": copy_gbs,
        "matmul_gflops": gflops,
    }
    stats = results["fit"].get("coreset")
    if stats and coreset > 0:
        report["coreset_gb_per_s"] = stats["steps"] * stats["bytes_per_step"] / coreset / 1e9
    search_tflop = search_arithmetic_tflop(results["run_dir"], results["fit"], floor["test_images"],
                                           resolved["data"]["image_size"])
    if search_tflop is not None:
        # A brute-force search cannot beat its arithmetic at the machine's matrix-product rate.
        search_floor = search_tflop * 1e3 / gflops
        report["search_tflop"] = search_tflop
        report["search_at_matmul_rate_s"] = search_floor
        report["loading_backbone_search_floor_over_backbone"] = (
            floor["image_loading"] + floor["backbone_forward"] + search_floor) / floor["backbone_forward"]
    (Path(results["run_dir"]) / "benchmark.json").write_text(json.dumps(report, indent=2))
    print("\n== Benchmark ==")
    for key, value in report.items():
        print(f"  {key:<44} {value:.3f}" if isinstance(value, float) else f"  {key:<44} {value}")
    return {**results, "benchmark": report}


def parse_value(text: str):
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and evaluate an anomaly detector.")
    parser.add_argument("--model", help="model name, e.g. padim; a comma list (padim,patchcore) runs a sweep")
    parser.add_argument("--dataset", help="dataset name: demo, mvtec, visa, btad, folder")
    parser.add_argument("--category", help="category of the dataset, e.g. bottle; 'all' or a comma list runs a sweep")
    parser.add_argument("--data-root", help="dataset root folder (else the dataset's environment variable)")
    for key, what in FOLDER_FLAGS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", help=f"--dataset folder: {what} (data.{key})")
    parser.add_argument("--backbone", help="timm backbone, e.g. wide_resnet50_2")
    parser.add_argument("--image-size", type=int, help="model input side in pixels")
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
                        help="any config key, dotted (repeatable): --set train.lr=0.1")
    parser.add_argument("--seeds", help="comma list of seeds (0,1,2): repeats every run; tables show mean ± std")
    parser.add_argument("--skip-done", action="store_true",
                        help="in a sweep, reuse runs whose resolved config already has results")
    return parser


def build_predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py predict", description="Score new images with a saved run.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder (or its checkpoint.pt)")
    source.add_argument("--model-file", help="an exported .onnx file, run with onnxruntime alone (see export.py)")
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
        from anomaly_framework.deploy_onnx import predict_onnx

        return predict_onnx(args.model_file, args.input, args.output_dir, overlays=not args.no_overlays)
    from anomaly_framework.predict import predict

    return predict(args.checkpoint, args.input, args.output_dir, args.device, overlays=not args.no_overlays)


FOLDER_FLAGS = {"train_dir": "folder of normal training images", "test_normal_dir": "folder of normal test images",
                "test_abnormal_dir": "folder of anomalous test images (sub-folders = defect types)",
                "mask_dir": "optional folder of masks, matched to anomalous images by stem",
                "valid_dir": "optional labelled validation folder with normal/ and abnormal/"}
FLAG_KEYS = {
    "model": "model.name", "dataset": "data.name", "category": "data.category", "data_root": "data.root",
    "backbone": "model.backbone", "image_size": "data.image_size", "epochs": "train.epochs",
    "batch_size": "data.batch_size", "device": "device", "seed": "seed", "output_dir": "output_dir",
    "resume": "train.resume", **{key: f"data.{key}" for key in FOLDER_FLAGS},
}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted overrides from the flags; ``--set`` entries come last and win."""
    from anomaly_framework.utils import FrameworkError

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


def one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else type(error).__name__
    return message.split("FrameworkError: ", 1)[-1]


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
    from anomaly_framework.utils import FrameworkError

    if kind == "export":
        from anomaly_framework.export import export

        return str(export(args.checkpoint, args.format, args.output, force=args.force)), None
    if kind == "predict":
        result = predict_command(args)
        for path, reason in result["skipped"]:
            print(f"skipped: {reason}", file=sys.stderr)
        print(f"{len(result['rows'])} images scored, {len(result['skipped'])} skipped; threshold {result['threshold']}")
        return result["output_dir"], None
    from anomaly_framework.sweep import run_sweep, split_list

    overrides = overrides_from_args(args)
    models = split_list(args.model) or [overrides.get("model.name", "padim")]
    categories = split_list(args.category) or [overrides.get("data.category")]
    seeds = [int(seed) for seed in split_list(args.seeds)] if args.seeds else [overrides.get("seed", 0)]
    if len(models) > 1 or len(categories) > 1 or categories == ["all"] or len(seeds) > 1 or args.skip_done:
        if args.benchmark:
            raise FrameworkError("--benchmark times one run: give one model, one category and one seed")
        for key in ("model.name", "data.category", "seed"):
            overrides.pop(key, None)
        sweep = run_sweep(overrides, models, categories, seeds, skip_done=args.skip_done)
        failed = sum(row["status"] == "failed" for row in sweep["rows"])
        problem = (f"{failed} of {len(sweep['rows'])} sweep runs failed (their errors are in "
                   f"{Path(sweep['sweep_dir']) / 'runs.csv'})") if failed else None
        return sweep["sweep_dir"], problem
    runner = run_benchmark if args.benchmark else run_experiment
    return runner(overrides)["run_dir"], None


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 1 when runs of a sweep failed, 2 for a user error, 130 on Ctrl-C."""
    kind, args = parse_command(sys.argv[1:] if argv is None else argv)
    from anomaly_framework.deploy_onnx import DeploymentError
    from anomaly_framework.utils import FrameworkError

    try:
        folder, problem = run_command(kind, args)
    except (FrameworkError, DeploymentError) as error:
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


if __name__ == "__main__":
    sys.exit(main())
