"""Where a frozen extractor's forward pass runs: eager PyTorch, or the same graph exported once.

A frozen backbone is a fixed function of its input, so it can run in an inference runtime that fuses
batch norms into convolutions and plans memory once (`model.backbone_runtime`):
- ``torch``: the eager module (always available, the reference);
- ``torchscript``: ``torch.jit.trace`` + ``freeze``, run after ``optimize_for_inference``;
- ``onnxruntime``: ONNX (opset 17, dynamic batch) in onnxruntime's CPU provider;
- ``openvino``: the same ONNX file compiled by OpenVINO for the CPU;
- ``auto``: eager on a GPU; on the CPU onnxruntime when installed, else torchscript. A fixed rule from
  measurements (docs/speed.md: Lite0 stages 1-3, batch 32, one thread: eager 1.31 s, torchscript
  0.39 s, onnxruntime 0.19 s), not a per-run race: timing the candidates would cost more than the
  difference on one cold run.
Each export is stored once per weights, layers, input size, device type and library versions under
``<cache>/backbones/`` (written to a temporary file and renamed into place, as the other caches), and
read back by every later run. Gradients never go through an exported copy: the extractor uses it only
for frozen, eval-mode passes on inputs that do not require gradients.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from anomaly_framework.errors import FrameworkError

RUNTIMES = ("auto", "torch", "torchscript", "onnxruntime", "openvino")
# Python packages an exported runtime needs (ONNX export needs the onnx package as well).
RUNTIME_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
ONNX_OPSET = 17
SUFFIXES = {"torchscript": ".pt", "onnxruntime": ".onnx", "openvino": ".onnx"}


def check_runtime(name: object) -> str:
    """The runtime name if known and installed; else a one-line error naming the key and the package."""
    if name not in RUNTIMES:
        raise FrameworkError(f"Unknown model.backbone_runtime '{name}': use one of {', '.join(RUNTIMES)}")
    missing = [package for package in RUNTIME_PACKAGES.get(name, ()) if importlib.util.find_spec(package) is None]
    if missing:
        raise FrameworkError(f"model.backbone_runtime='{name}' needs the package '{missing[-1]}', which is not installed "
                             f"(pip install {' '.join(missing)}, or the 'export' extra)")
    return name


def resolve_runtime(name: str, device_type: str) -> str:
    """The concrete runtime of ``name`` on a device type (``auto``'s rule is in the module docstring)."""
    if name != "auto":
        return name
    if device_type != "cpu":
        return "torch"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx") else "torchscript"


def module_digest(module: nn.Module, *facts: object) -> str:
    """sha1 of ``facts`` and every weight and buffer of ``module`` (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha1(repr(facts).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _library_versions(runtime: str) -> tuple[str, ...]:
    """torch's, timm's and the runtime's package versions, read from the installed metadata: importing
    onnx only for its version cost 0.9 s of every warm run."""
    versions = [torch.__version__]
    for package in ("timm", *RUNTIME_PACKAGES.get(runtime, ())):
        try:
            versions.append(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu: the module itself says
            versions.append(getattr(importlib.import_module(package), "__version__", "?"))
    return tuple(versions)


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` beside ``target``, then renamed into place (concurrent writers are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


class _Tupled(nn.Module):
    """The eager computation with a tuple output, as tracing and ONNX export want it."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.owner = owner
        self.train(False)  # freezing wants eval mode (the frozen owner is in it anyway)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.owner.eager(images))


def _export(module: nn.Module, runtime: str, example: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        if runtime == "torchscript":
            torch.jit.save(torch.jit.freeze(torch.jit.trace(module, example, check_trace=False)), path)
            return
        outputs = [f"stage{index}" for index in range(len(module(example)))]
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=ONNX_OPSET, input_names=["images"],
                          output_names=outputs, dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]})


def _load(runtime: str, path: Path, device: torch.device) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A callable images -> per-stage features running the stored export ``path``."""
    threads = torch.get_num_threads()  # OMP_NUM_THREADS, as the eager path uses
    if runtime == "torchscript":
        scripted = torch.jit.optimize_for_inference(torch.jit.load(str(path), map_location=device))
        return lambda images: list(scripted(images))
    if runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: [torch.from_numpy(out).to(images.device)
                               for out in session.run(None, {"images": images.detach().cpu().numpy()})]
    import openvino

    # f32 explicitly: OpenVINO's CPU plugin otherwise computes in bf16 where the CPU has it (7e-3 off eager).
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                "INFERENCE_PRECISION_HINT": "f32"})

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        results = compiled(images.detach().cpu().numpy())  # one inference, every output
        return [torch.from_numpy(results[out].copy()).to(images.device) for out in compiled.outputs]

    return run


class ExportedBackbone:
    """The exported copies of one frozen extractor, one per (device type, input shape), loaded lazily.

    Args:
        owner: the extractor; its ``eager(images)`` (a list of per-stage features) is what is exported,
            its weights and buffers are hashed into the file name.
        runtime: a name from ``RUNTIMES``.
        folder: where exports are stored (``<cache>/backbones``).
        facts: what else identifies the computation (architecture, layers...).
    """

    def __init__(self, owner: nn.Module, runtime: str, folder: Path, facts: tuple) -> None:
        self.owner, self.runtime, self.folder, self.facts = owner, check_runtime(runtime), Path(folder), facts
        self._loaded: dict[tuple, Callable | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": {}}  # sessions are rebuilt from the files, never copied

    def forget(self) -> None:
        """Drops the loaded copies after the weights changed (a loaded state dict, a batch-norm pass)."""
        self._loaded.clear()

    def concrete(self, device_type: str) -> str:
        return resolve_runtime(self.runtime, device_type)

    def path(self, runtime: str, shape: tuple[int, ...], device_type: str) -> Path:
        """The stored export of this extractor for one runtime, input shape [C, H, W] and device type."""
        key = module_digest(self.owner, self.facts, runtime, shape, device_type, _library_versions(runtime))
        return self.folder / f"{key}{SUFFIXES[runtime]}"

    def runner(self, images: torch.Tensor) -> Callable | None:
        """The exported forward for these inputs' shape and device (exported on first use), or None for eager."""
        shape, device = tuple(images.shape[1:]), images.device
        slot = (device.type, shape)
        if slot not in self._loaded:
            runtime = self.concrete(device.type)
            runner = None
            if runtime != "torch":
                path = self.path(runtime, shape, device.type)
                if not path.is_file():
                    module = _Tupled(self.owner)
                    example = torch.zeros(2, *shape, device=device)
                    try:
                        _atomic_write(path, lambda temporary: _export(module, runtime, example, temporary))
                    except OSError as error:  # a read-only or full cache folder: the run goes on eagerly
                        warnings.warn(f"Cannot store the {runtime} backbone in '{self.folder}' ({error}): running "
                                      f"it in torch (set data.cache_dir to a writable folder)")
                runner = _load(runtime, path, device) if path.is_file() else None
            self._loaded[slot] = runner
        return self._loaded[slot]
