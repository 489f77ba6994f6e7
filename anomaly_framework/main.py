"""``run_experiment(config)``: one run from a config dict to its run folder, for notebooks and the CLI.

    from anomaly_framework.main import run_experiment
    results = run_experiment({"model.name": "padim", "data.name": "demo"})

Each run writes ``<output_dir>/<dataset>/<category>/<model>/<timestamp>/`` with config.json, results.json,
scores.csv, checkpoint.pt, roc_curve.png and figures/. The command line is ``anomaly_framework.cli``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from anomaly_framework.backbones.extractors import weights_record
from anomaly_framework.config import resolve_config
from anomaly_framework.reporting.predictions import new_output_dir
from anomaly_framework.errors import FrameworkError, one_line
from anomaly_framework.execution.distributed import broadcast_object, init_from_env, is_main, rank, world_size
from anomaly_framework.execution.interrupts import ctrl_c_stops_at_next_batch
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.models.model_base import check_image_size, check_tiling
from anomaly_framework.reporting.figures import save_sample_figures, save_score_histogram
from anomaly_framework.trainers.trainer_base import describe_resolution
from anomaly_framework.utils import (RunInterrupted, library_versions, peak_memory_mb, resolve_device,
                                     save_roc_curve, save_scores_csv, seed_everything, show_data_info, show_model_info,
                                     show_results, show_train_info, read_status, write_status)


def make_run_dir(config: dict) -> Path:
    """A new folder per run; never reuses one, even for two runs started in the same second."""
    data = config["data"]
    parent = Path(config["output_dir"]) / data["name"] / str(data["category"]) / config["model"]["name"]
    try:
        return new_output_dir(parent)
    except FrameworkError as error:
        raise FrameworkError(f"{error} (output_dir '{config['output_dir']}'); choose another --output-dir") from error


def backbone_facts(model: torch.nn.Module, config: dict) -> dict:
    """Backbone name, weight source and whether it was pretrained, for results.json."""
    model_cfg = config["model"]
    return {
        "backbone": model_cfg.get("backbone", "none"),
        **weights_record(model),
        "pretrained": bool(model_cfg.get("pretrained", False)),
    }


def run_folder(config: dict, run_dir: str | Path | None) -> Path:
    """The folder this run writes: ``run_dir`` when given (a sweep names it; a retried or requeued job
    comes back to it), the interrupted run's own folder when ``train.resume`` continues one that is not
    done, else a new folder. A finished run resumed to train longer keeps its results: a new folder then."""
    resume = config["train"].get("resume")
    if run_dir is None and resume and read_status(resume)["status"] != "done":
        run_dir = resume
    if run_dir is None:
        return make_run_dir(config)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FrameworkError(f"Cannot create the run folder '{run_dir}': {error.strerror or error}") from error
    return Path(run_dir)


def run_experiment(config: dict | None = None, run_dir: str | Path | None = None) -> dict:
    """Resolves ``config``, fits the model, evaluates it on the test split and writes the run folder.

    Args:
        config: overrides of the defaults, nested (``{"model": {"name": "padim"}}``) or dotted
            (``{"model.name": "padim", "data.category": "bottle"}``).
        run_dir: the folder to write (created if missing); None = see ``run_folder``.

    Returns:
        results.json's content plus ``config`` (the resolved config). Under ``torchrun`` every rank helps
        to fit, rank 0 alone evaluates and writes; the other ranks return their fit summary only.
    """
    start = time.perf_counter()
    config = resolve_config(config)
    seed_everything(config["seed"])
    device, started_group = init_from_env(resolve_device(config["device"]))
    try:
        with ctrl_c_stops_at_next_batch():
            results = _run(config, device, start, run_dir)
        return results
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _run(config: dict, device: torch.device, start: float, run_dir: str | Path | None) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dataloader = build_dataloader(config)
    model = build_model(config)
    check_tiling(model, config["data"])
    if config["data"]["tile_size"] is None:  # tiled, the model only sees tiles
        check_image_size(model, config["data"]["image_size"])
    modeler = build_modeler(config, model)
    run_dir = Path(broadcast_object(str(run_folder(config, run_dir)) if is_main() else None))
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
    if trainer is not None and "epochs" in trainer.config["train"]:  # an epoch-trained run before its first save
        return f"run interrupted {where}; nothing was saved to resume: run it again to restart"
    return f"run interrupted {where}; nothing to resume for this model: run it again"


def _fit_and_evaluate(config: dict, trainer, model, device, start: float) -> dict:
    """Fit, evaluation and every output file of one run (rank 0 alone evaluates and writes)."""
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
