"""Export a saved run for deployment: ONNX, TorchScript or OpenVINO, with a JSON sidecar.

    python main.py export --checkpoint RUN_DIR --format onnx|torchscript|openvino [--output FILE] [--force]

The artifact is self-contained: it takes uint8 RGB images [B, H, W, 3] (any batch size) at the run's
input size, applies the run's normalisation, runs the model and its post-processing, and returns the
anomaly map [B, H, W] at the input resolution, the image score [B] and the label [B] (1 = anomalous,
score ≥ the run's stored threshold). Resizing and centre-cropping stay outside, as in the run's dataset
(``images.geometry.resize_and_crop``, which the ONNX runner calls too). Every export is checked against the eager model on random
images at two batch sizes; the differences are written into the sidecar.
A tiled run (``data.tile_size``) exports the model on one tile: the artifact takes tiles, and the sidecar's
``tile_size`` / ``tile_stride`` tell the runner how to cut the ``image_size`` image (``native``: each image at
its own size, ``resize`` null) and stitch the tiles' maps (``images.tiling``, the modelers' own code), the
image score being the stitched map's maximum.
"""
from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from anomaly_framework.errors import FrameworkError
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.ops.normalize import IMAGENET_MEAN, IMAGENET_STD
from anomaly_framework.reporting.predictions import NORMALIZED_FORMULA
from anomaly_framework.trainers.checkpoint_files import CHECKPOINT_NAME, read_checkpoint
from anomaly_framework.utils import library_versions

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "openvino": ".xml"}
EXTRA_HINT = 'pip install -e ".[export]"'
CHECKPOINT_FORMAT = 1
ONNX_OPSET = 17
OUTPUT_NAMES = ("anomaly_map", "score", "label")
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


class DeployedModel(nn.Module):
    """A run's model with its preprocessing and threshold: uint8 RGB [B, H, W, 3] → map, score, label."""

    def __init__(self, modeler, data_cfg: dict, threshold: float) -> None:
        super().__init__()
        self.modeler = copy.copy(modeler)
        self.modeler.tiling_enabled = False  # the graph scores one tile; the runner tiles and stitches
        self.model = modeler.model  # registered, so tracing sees every weight and buffer
        imagenet = data_cfg["normalize"] == "imagenet"
        mean = IMAGENET_MEAN if imagenet else (0.0, 0.0, 0.0)
        std = IMAGENET_STD if imagenet else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        # The smallest float32 ≥ the (float64) threshold: float32 scores compare as they do against the float64.
        bound = np.float32(threshold)
        if float(bound) < threshold:
            bound = np.nextafter(bound, np.float32(np.inf))
        self.register_buffer("threshold", torch.tensor(float(bound), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = (images.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std  # as the run's dataset
        outputs = self.modeler.evaluate_step({"image": inputs})
        scores = outputs["anomaly_scores"].float()
        return outputs["anomaly_maps"][:, 0].float(), scores, (scores >= self.threshold).long()


def load_run(run_dir: str | Path):
    """The run's modeler and checkpoint; a checkpoint this version cannot rebuild is one clear error."""
    path = Path(run_dir)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise FrameworkError(f"Checkpoint '{path}' not found (give a run folder or its checkpoint.pt)")
    saved = read_checkpoint(path, "cpu", needs=())  # a truncated or foreign file is one line naming it
    version = saved.get("format_version") if isinstance(saved, dict) else None
    if version != CHECKPOINT_FORMAT or saved.get("threshold") is None:
        raise FrameworkError(f"Checkpoint '{path}' has format_version {version} and threshold "
                             f"{saved.get('threshold') if isinstance(saved, dict) else None}; this version exports "
                             f"format {CHECKPOINT_FORMAT} with a stored threshold: re-run the experiment to make one")
    try:
        return load_checkpoint(path)
    except (KeyError, TypeError) as error:
        raise FrameworkError(f"Checkpoint '{path}' was written by an older version of this framework (config key "
                             f"{error} missing or changed): re-run the experiment to make one") from error


def default_output(run_dir: str | Path, format: str) -> Path:
    """``<run>/export/model<suffix>``."""
    run = Path(run_dir)
    run = run if run.is_dir() else run.parent
    return run / "export" / f"model{FORMATS[format]}"


def written_files(output: Path, format: str) -> list[Path]:
    """Every file an export writes: the artifact, OpenVINO's weights file, the sidecar."""
    files = [output, Path(f"{output}.json")]
    return files + [output.with_suffix(".bin")] if format == "openvino" else files


def _require(format: str) -> None:
    """The optional packages a format needs, or one line naming the extra."""
    needed = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"), "torchscript": ()}[format]
    for package in needed:
        try:
            __import__(package)
        except ImportError as error:
            raise FrameworkError(f"Exporting to {format} needs the '{package}' package: {EXTRA_HINT}") from error


def export(run_dir: str | Path, format: str, output: str | Path | None = None, force: bool = False) -> Path:
    """Exports a run's model and writes the sidecar ``<output>.json``; returns the artifact's path.

    Args:
        run_dir: a run folder or its checkpoint.pt.
        format: ``onnx``, ``torchscript`` or ``openvino``.
        output: the artifact's path; default ``<run>/export/model.onnx`` (``.torchscript.pt``, ``.xml``).
        force: overwrite existing files; without it an existing output is refused.
    """
    if format not in FORMATS:
        raise FrameworkError(f"Unknown export format '{format}': choose one of {', '.join(FORMATS)}")
    _require(format)
    output = Path(output) if output else default_output(run_dir, format)
    existing = [str(path) for path in written_files(output, format) if path.exists()]
    if existing and not force:
        raise FrameworkError(f"Output '{existing[0]}' exists: pass --force to overwrite it, or choose --output")
    modeler, saved = load_run(run_dir)
    config = saved["config"]
    deployed = deployable(modeler, config, saved["threshold"])
    size, group = input_side(config["data"]), modeler.tile_group()  # a tiled ensemble: its tiles per image
    example = torch.randint(0, 256, (2 * group, size, size, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on Python ints: sizes are fixed by the run, batch aside
        WRITERS[format](deployed, example, output)
    sidecar, sidecar_path = describe(config, saved, format, output, group), Path(f"{output}.json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2))  # the ONNX runner reads it
    sidecar["export_check"] = export_check(modeler, config, saved["threshold"], load_artifact(output, format))
    sidecar_path.write_text(json.dumps(sidecar, indent=2))
    return output


def input_side(data_cfg: dict) -> int:
    """The artifact's input side: the tile of a tiled run, else the run's image size."""
    return data_cfg.get("tile_size") or data_cfg["image_size"]


def deployable(modeler, config: dict, threshold: float) -> DeployedModel:
    """The traceable wrapper of a loaded run; a model with ``prepare_export`` switches on a shallow copy, so
    ``modeler`` keeps its own code path (the eager reference of the checks)."""
    model = copy.copy(modeler.model)
    if hasattr(model, "prepare_export"):
        model.prepare_export()
    wrapper = copy.copy(modeler)
    wrapper.model = wrapper.network = model
    return DeployedModel(wrapper, config["data"], threshold).eval()


def _write_torchscript(deployed: DeployedModel, example: torch.Tensor, output: Path) -> None:
    traced = torch.jit.trace(deployed, (example,), check_trace=False)
    traced.save(str(output))


def _write_onnx(deployed: DeployedModel, example: torch.Tensor, output: Path) -> None:
    batch = {0: "batch"}
    torch.onnx.export(deployed, (example,), str(output), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=["images"], output_names=list(OUTPUT_NAMES),
                      dynamic_axes={name: batch for name in ("images", *OUTPUT_NAMES)})


def _write_openvino(deployed: DeployedModel, example: torch.Tensor, output: Path) -> None:
    import openvino

    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(folder) / "model.onnx"
        _write_onnx(deployed, example, onnx_file)
        converted = openvino.convert_model(str(onnx_file))
    openvino.save_model(converted, str(output), compress_to_fp16=False)  # float32 weights, as the run


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "openvino": _write_openvino}


def load_artifact(path: str | Path, format: str, threads: int = 0) -> Runner:
    """A function uint8 [B, H, W, 3] → (maps, scores, labels) as numpy arrays, running the exported file."""
    path = Path(path)
    if format == "onnx":
        from anomaly_framework.deploy.onnx_runner import OnnxDetector

        return OnnxDetector(path, threads).run
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the portable format
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_torchscript(images: np.ndarray):
            with torch.no_grad():
                return tuple(output.numpy() for output in module(torch.from_numpy(images)))
        return run_torchscript
    if format == "openvino":
        import openvino

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        compiled = openvino.Core().compile_model(str(path), "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})

        def run_openvino(images: np.ndarray):
            result = compiled(images)
            return tuple(np.asarray(result[compiled.output(index)]) for index in range(3))
        return run_openvino
    raise FrameworkError(f"Unknown export format '{format}': choose one of {', '.join(FORMATS)}")


def eager_runner(modeler, config: dict, threshold: float) -> Runner:
    """The eager model behind the same contract, for parity checks and benchmarks."""
    deployed = DeployedModel(modeler, config["data"], threshold).eval()

    def run_eager(images: np.ndarray):
        with torch.inference_mode():
            return tuple(output.numpy() for output in deployed(torch.from_numpy(images)))
    return run_eager


def differences(reference: tuple, candidate: tuple) -> dict[str, float]:
    """Max absolute difference of maps and scores, the relative ones (÷ the reference's largest |value|),
    and the number of labels that differ."""
    report = {}
    for name, ref, got in zip(("map", "score"), reference[:2], candidate[:2]):
        gap = float(np.abs(ref.astype(np.float64) - got).max())
        report[f"{name}_max_abs"] = gap
        report[f"{name}_max_rel"] = gap / max(float(np.abs(ref).max()), 1e-12)
    report["labels_differing"] = int((reference[2] != candidate[2]).sum())
    return report


def export_check(modeler, config: dict, threshold: float, runner: Runner) -> dict:
    """Exported vs eager outputs on random images, at batch 1 and 3 (the trace used 2: the batch is dynamic;
    a tiled ensemble's batches count whole images' tiles)."""
    size, group = input_side(config["data"]), modeler.tile_group()
    images = np.random.default_rng(1).integers(0, 256, (3 * group, size, size, 3), dtype=np.uint8)
    eager = eager_runner(modeler, config, threshold)
    reports = [differences(eager(batch), runner(batch)) for batch in (images[:group], images)]
    return {"images": f"random uint8, batches of {group} and {3 * group}",
            **{key: max(report[key] for report in reports) for key in reports[0]}}


def describe(config: dict, saved: dict, format: str, output: Path, group: int = 1) -> dict:
    """The sidecar: the model, the input contract, the outputs, the threshold and its source, the versions;
    ``group``: the tiles an image's call must hold (a tiled ensemble's tile positions), else 1."""
    data, model = config["data"], config["model"]
    size, native = input_side(data), data["image_size"] == "native"
    versions = library_versions()
    for package in ("onnx", "onnxruntime", "openvino"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return {
        "format": format,
        "file": output.name,
        "model": model["name"],
        "backbone": model.get("backbone", "none"),
        "dataset": f"{data['name']}/{data['category']}",
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": ["batch", size, size, 3],
                  "colour": "RGB", "image_size": data["image_size"], "resize": None if native else round(data["image_size"] / data["crop_ratio"]),
                  "tile_size": data.get("tile_size"), "tile_stride": data.get("tile_stride") or data.get("tile_size"),
                  "tile_group": group,
                  "interpolation": data["interpolation"],
                  "outside_the_model": ("each image at its own size (image_size native: no resize, no crop)" if native else
                                        "resize to resize×resize (interpolation, on uint8), centre-crop image_size")
                  + (", cut tile_size tiles every tile_stride px (images.tiling); tile maps stitched by overlap "
                     "averaging, score = the stitched map's maximum" if data.get("tile_size") else "")
                  + (", every tile of an image in one call, in tile order (tile_group: a Gaussian set per tile "
                     "position)" if group > 1 else ""),
                  "inside_the_model": f"/255, normalize {data['normalize']}"},
        "outputs": {"anomaly_map": ["batch", size, size], "score": ["batch"],
                    "label": "batch, int64, 1 if score >= threshold"},
        "threshold": saved["threshold"],
        "threshold_source": saved.get("threshold_source"),
        "threshold_calibration": saved.get("threshold_calibration"),
        "score_scale": saved.get("score_scale"),
        "normalized_score": NORMALIZED_FORMULA,
        "onnx_opset": ONNX_OPSET if format != "torchscript" else None,
        "versions": versions,
    }
