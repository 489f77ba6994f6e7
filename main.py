"""Entry point: ``run_experiment(config)`` for notebooks and the command line alike.

    python main.py --model padim --dataset mvtec --category bottle --data-root /data/mvtec

Each run writes ``<output_dir>/<dataset>/<category>/<model>/<timestamp>/`` with config.json,
results.json, checkpoint.pt, roc_curve.png and figures/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from config import resolve_config
from models.model_base import TimmFeatureExtractor
from registry import build_dataloader, build_model, build_modeler, build_trainer
from utils import (
    FrameworkError,
    library_versions,
    peak_memory_mb,
    resolve_device,
    save_roc_curve,
    save_sample_figures,
    seed_everything,
    show_data_info,
    show_model_info,
    show_results,
    show_train_info,
)


def make_run_dir(config: dict) -> Path:
    """A new folder per run; never reuses one, even for two runs started in the same second."""
    data = config["data"]
    parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / config["model"]["name"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise FrameworkError(f"Could not create a new run folder under '{parent}'")


def backbone_facts(model: torch.nn.Module, config: dict) -> dict:
    """Backbone name, weight source and whether it was pretrained, for results.json."""
    extractor = next((m for m in model.modules() if isinstance(m, TimmFeatureExtractor)), None)
    model_cfg = config["model"]
    return {
        "backbone": model_cfg.get("backbone", "none"),
        "weights_source": extractor.weights_source if extractor is not None else "trained from scratch",
        "pretrained": bool(model_cfg.get("pretrained", False)),
    }


def run_experiment(config: dict | None = None) -> dict:
    """Resolves ``config``, fits the model, evaluates it on the test split and writes the run folder.

    Args:
        config: overrides of the defaults, nested (``{"model": {"name": "padim"}}``) or dotted
            (``{"model.name": "padim", "data.category": "bottle"}``).

    Returns:
        results.json's content plus ``config`` (the resolved config).
    """
    start = time.perf_counter()
    config = resolve_config(config)
    seed_everything(config["seed"])
    device = resolve_device(config["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataloader = build_dataloader(config)
    model = build_model(config)
    modeler = build_modeler(config, model)
    run_dir = make_run_dir(config)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    show_data_info(dataloader.info())
    show_model_info(model, backbone_facts(model, config))
    show_train_info(config, device, run_dir)

    trainer = build_trainer(config, modeler, dataloader, run_dir, device)
    fit_summary = trainer.fit()
    metrics, predictions = trainer.evaluate()
    if config["eval"]["save_checkpoint"]:
        trainer.save_checkpoint()
    save_sample_figures(run_dir, predictions, dataloader.test_dataset, trainer.threshold, config["eval"]["num_figures"])
    save_roc_curve(run_dir, predictions.labels.numpy(), predictions.scores.numpy(), metrics.get("image_auroc"))

    timings = {key: round(value, 4) for key, value in trainer.timings.items()}
    timings["total"] = round(time.perf_counter() - start, 4)
    results = {
        "metrics": metrics,
        "timings": timings,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        **backbone_facts(model, config),
        "mask_size": config["data"]["mask_size"] or config["data"]["image_size"],
        "fit": fit_summary,
        "versions": library_versions(),
        "run_dir": str(run_dir),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    show_results(results)
    return {**results, "config": config}


def parse_value(text: str):
    """``--set`` values are JSON where they parse (numbers, true, null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train and evaluate an anomaly detector.")
    parser.add_argument("--model", help="model name, e.g. padim")
    parser.add_argument("--dataset", help="dataset name: demo, mvtec, visa, btad")
    parser.add_argument("--category", help="category of the dataset, e.g. bottle")
    parser.add_argument("--data-root", help="dataset root folder (else the dataset's environment variable)")
    parser.add_argument("--backbone", help="timm backbone, e.g. wide_resnet50_2")
    parser.add_argument("--image-size", type=int, help="model input side in pixels")
    parser.add_argument("--epochs", type=int, help="training epochs (gradient-trained models)")
    parser.add_argument("--batch-size", type=int, help="batch size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--output-dir", help="folder for run outputs (default experiments)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, dotted (repeatable): --set train.lr=0.1")
    return parser


FLAG_KEYS = {
    "model": "model.name", "dataset": "data.name", "category": "data.category", "data_root": "data.root",
    "backbone": "model.backbone", "image_size": "data.image_size", "epochs": "train.epochs",
    "batch_size": "data.batch_size", "device": "device", "seed": "seed", "output_dir": "output_dir",
}


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Dotted overrides from the flags; ``--set`` entries come last and win."""
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run_experiment(overrides_from_args(args))
    except FrameworkError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(results["run_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
