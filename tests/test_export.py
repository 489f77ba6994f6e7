"""Export for deployment (issue 17): every model's exported artifact against the eager model on demo images,
the torch-free ONNX predict path against today's predict, and the one-line refusals.

Parity tolerance: maps and scores within 1e-4 of the eager output's largest |value| (float32 graphs,
other kernels); labels equal wherever the score is not within that tolerance of the threshold.
"""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, Sample
from anomaly_framework.deploy.onnx_runner import OnnxDetector, predict_onnx
from anomaly_framework.reporting.predictions import jet, short_verdicts
from anomaly_framework.deploy.export import export
from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.models.nearest_neighbors import bank_chunked_topk_nearest
from anomaly_framework.inference.predict import predict
from anomaly_framework.factories import build_dataloader, build_model, build_modeler
from anomaly_framework.registry import MODEL_REGISTRY
from anomaly_framework.errors import FrameworkError

ROOT = Path(__file__).resolve().parents[1]
RELATIVE_TOLERANCE = 1e-4
SIZE = 32
TINY_MODELS = {"draem": {"reconstructive_width": 8, "discriminative_width": 8},
               "ae": {"base_channels": 8}, "unet_ae": {"base_channels": 8},
               "vae": {"base_channels": 8}, "unet_vae": {"base_channels": 8},
               # Layer 4 of a 32-pixel input is 1×1, which CFlow's reflection padding cannot take.
               "cflow": {"backbone": "resnet18", "pretrained": False, "layers": [1, 2, 3], "coupling_blocks": 2}}
SMALL_BACKBONE_MODELS = {"dfm": {"pooling_kernel_size": 2}}  # resnet18's layer3 is 2×2 at 32 px
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
FORMATS = ["onnx", "torchscript",
           pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed "
                                                               "(optional: pip install -e '.[export]')"))]


def _config(demo_root, tmp_path, name: str) -> dict:
    backbone = {"backbone": "resnet18", "pretrained": False} if name not in TINY_MODELS else TINY_MODELS[name]
    backbone.update(SMALL_BACKBONE_MODELS.get(name, {}))
    return resolve_config({"model": {"name": name, **backbone},
                           "data": {"name": "demo", "root": str(demo_root), "image_size": SIZE, "batch_size": 8},
                           "output_dir": str(tmp_path), "eval": {"num_figures": 0}})


@pytest.fixture(scope="module", params=MODEL_REGISTRY.names())
def tiny_run(request, demo_root, tmp_path_factory):
    """A run folder per model: memory models fitted on the demo train images, others at their random
    initialisation; the threshold is the median test score, so both labels occur."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(name)
    config = _config(demo_root, run_dir, name)
    torch.manual_seed(0)
    modeler = build_modeler(config, build_model(config))
    dataloader = build_dataloader(config)
    if modeler.one_pass:
        modeler.begin_fit(len(dataloader.train_dataset))
        for batch in dataloader.train_loader(shuffle=False):
            modeler.training_step(batch)
        modeler.fit()
    dataset = dataloader.test_dataset
    indices = range(0, len(dataset), max(1, len(dataset) // 6))
    images = np.stack([dataset.load(i)[0].permute(1, 2, 0).numpy() for i in indices])  # uint8 [B, H, W, 3]
    with torch.no_grad():
        eager = modeler.evaluate_step({"image": torch.stack([dataset[i]["image"] for i in indices])})
    scores = eager["anomaly_scores"].numpy()
    threshold = float(np.median(scores))
    torch.save({"format_version": 1, "model": modeler.state_dict(), "config": config, "threshold": threshold,
                "threshold_source": "test: median of the test scores"}, run_dir / "checkpoint.pt")
    return {"run_dir": run_dir, "images": images, "maps": eager["anomaly_maps"][:, 0].numpy(), "scores": scores,
            "threshold": threshold, "name": name}


@pytest.mark.parametrize("format", FORMATS)
def test_every_model_exports_with_parity(tiny_run, format):
    from anomaly_framework.deploy.export import load_artifact

    path = export(tiny_run["run_dir"], format)
    maps, scores, labels = load_artifact(path, format)(tiny_run["images"])  # 6 images; the trace used 2
    scale = np.abs(tiny_run["maps"]).max()
    np.testing.assert_allclose(maps, tiny_run["maps"], rtol=0, atol=RELATIVE_TOLERANCE * scale)
    np.testing.assert_allclose(scores, tiny_run["scores"], rtol=0, atol=RELATIVE_TOLERANCE * np.abs(tiny_run["scores"]).max())
    clear = np.abs(tiny_run["scores"] - tiny_run["threshold"]) > RELATIVE_TOLERANCE * np.abs(tiny_run["scores"]).max()
    np.testing.assert_array_equal(labels[clear], (tiny_run["scores"] >= tiny_run["threshold"])[clear])
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["model"] == tiny_run["name"] and sidecar["threshold"] == tiny_run["threshold"]
    assert sidecar["input"]["shape"] == ["batch", SIZE, SIZE, 3] and sidecar["input"]["layout"] == "NHWC"
    assert sidecar["export_check"]["map_max_rel"] <= RELATIVE_TOLERANCE


def test_export_search_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 16, generator=generator), torch.randn(300, 16, generator=generator)
    distances, indices = bank_chunked_topk_nearest(queries, bank, k=3, chunk_mb=0.01, sized_for=50)  # 52-row chunks
    expected, expected_indices = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False)
    torch.testing.assert_close(distances.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(indices, expected_indices)


def test_jet_equals_matplotlib():
    from matplotlib import colormaps

    values = np.linspace(0, 1, 10001)
    np.testing.assert_allclose(jet(values), colormaps["jet"](values)[:, :3], rtol=0, atol=1e-12)


# -- the deployment path -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padim_export(demo_root, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("padim_run")
    results = run_experiment({"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                              "data.name": "demo", "data.root": str(demo_root), "data.image_size": 64,
                              "eval.num_figures": 0, "output_dir": str(tmp_path)})
    assert main(["export", "--checkpoint", results["run_dir"], "--format", "onnx"]) == 0
    return Path(results["run_dir"]), Path(results["run_dir"]) / "export" / "model.onnx"


def _read_csv(path: Path) -> dict:
    with open(path) as handle:
        return {row["image_path"]: (float(row["score"]), int(row["label"]), float(row["normalized_score"]))
                for row in csv.DictReader(handle)}


def test_onnx_predict_imports_no_torch_and_matches_predict(padim_export, demo_root, tmp_path):
    run_dir, model_file = padim_export
    inputs = demo_root / "fabric" / "test"
    script = ("import sys; from anomaly_framework.deploy import onnx_runner; code = onnx_runner.main(sys.argv[1:]); "
              "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm') "
              "or m.startswith(('anomaly_framework.main', 'anomaly_framework.deploy.export', 'anomaly_framework.trainers', "
              "'anomaly_framework.models', 'anomaly_framework.utils', 'anomaly_framework.dataloaders'))]; "
              "assert not loaded, loaded; sys.exit(code)")
    deployed_dir, torch_dir = tmp_path / "onnx", tmp_path / "torch"
    done = subprocess.run([sys.executable, "-c", script, "--model-file", str(model_file), "--input", str(inputs),
                           "--output-dir", str(deployed_dir)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    predict(run_dir, inputs, torch_dir)
    deployed, reference = _read_csv(deployed_dir / "predictions.csv"), _read_csv(torch_dir / "predictions.csv")
    assert deployed.keys() == reference.keys()
    scores = np.array([[deployed[k][0], reference[k][0]] for k in reference])
    np.testing.assert_allclose(scores[:, 0], scores[:, 1], rtol=0, atol=RELATIVE_TOLERANCE * np.abs(scores).max())
    assert [deployed[k][1] for k in reference] == [reference[k][1] for k in reference]
    # The normalised score: 0.5 at the sidecar's threshold, the same in the torch-free runner as in predict.
    sidecar = json.loads(model_file.with_name(model_file.name + ".json").read_text())
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert sidecar["score_scale"] == checkpoint["score_scale"] > 0 and sidecar["threshold"] == checkpoint["threshold"]
    assert sidecar["threshold_calibration"] == checkpoint["threshold_calibration"]
    normalized = np.array([[deployed[k][2], reference[k][2]] for k in reference])
    np.testing.assert_allclose(normalized[:, 0], normalized[:, 1], atol=1e-4)
    assert [n >= 0.5 for n in normalized[:, 1]] == [bool(reference[k][1]) for k in reference]
    overlays = sorted(p.name for p in torch_dir.glob("*_overlay.png"))
    assert overlays == sorted(p.name for p in deployed_dir.glob("*_overlay.png")) and overlays
    # Both map back with the same code (images.geometry); the ONNX and eager maps differ by float rounding, so a
    # heat value on a colour-table boundary may take the next of jet's 256 colours: at most 1/64 per channel
    # × 0.45 × 255 ≈ 2 grey levels.
    # Both draw the score banner across the top with the same code: where the two scores print alike the
    # whole overlay matches, band included (its text is drawn over the same heat map, dimmed).
    threshold = json.loads(Path(f"{model_file}.json").read_text())["threshold"]
    alike = 0
    for name in overlays:
        deployed_image, reference_image = (np.asarray(Image.open(d / name), dtype=int) for d in (deployed_dir, torch_dir))
        key = next(k for k in reference if "__".join(Path(k).relative_to(inputs).with_suffix("").parts) + "_overlay.png" == name)
        texts = (short_verdicts(deployed[key][0], threshold), short_verdicts(reference[key][0], threshold))
        top = 0 if texts[0] == texts[1] else len(reference_image) // 2
        alike += top == 0
        assert np.abs(deployed_image[top:] - reference_image[top:]).max() <= 2, name
    assert alike > len(overlays) // 2
def test_onnx_predict_resizes_odd_images_and_refuses_wrong_arrays(padim_export, demo_root, tmp_path, capsys):
    _, model_file = padim_export
    source = next((demo_root / "fabric" / "test").glob("*/*.png"))
    Image.open(source).convert("L").resize((90, 70)).save(tmp_path / "gray.png")
    assert main(["predict", "--model-file", str(model_file), "--input", str(tmp_path / "gray.png")]) == 0
    out_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert Image.open(out_dir / "gray_overlay.png").size == (90, 70)
    detector = OnnxDetector(model_file)
    for wrong in (np.zeros((1, 63, 64, 3), np.uint8), np.zeros((1, 64, 64, 1), np.uint8), np.zeros((1, 64, 64, 3))):
        with pytest.raises(FrameworkError, match=r"takes uint8 RGB images \[B, 64, 64, 3\]"):
            detector.run(wrong)


def _odd_files(folder: Path) -> tuple[dict[str, Path], np.ndarray]:
    """A 16-bit grey gradient, a palette image, grey + alpha and an EXIF-rotated PNG, each 80 × 60 as shown;
    and the RGB array the rotated file shows."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    files = {name: folder / f"{name}.png" for name in ("gray16", "palette", "gray_alpha", "exif_rotated")}
    Image.fromarray(np.linspace(0, 65535, 60 * 80).round().astype(np.uint16).reshape(60, 80)).save(files["gray16"])
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    rgb.reshape(-1, 3)[: 60 * 40] = (200, 30, 30)  # a block of one colour, so the palette keeps it exactly
    Image.fromarray(rgb).quantize(colors=64, dither=Image.Dither.NONE).save(files["palette"])
    Image.fromarray(np.stack([rgb[..., 0], rgb[..., 1]], -1), "LA").save(files["gray_alpha"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 × 80, shown rotated 90° clockwise: 80 × 60
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1))).save(files["exif_rotated"], exif=exif)
    return files, rgb


def test_odd_files_reach_the_model_alike_through_training_predict_and_the_onnx_runner(padim_export, tmp_path):
    """One decoder: 16-bit grey, palette, grey + alpha and EXIF-rotated files give the same model input to the
    dataset (training, evaluation and ``predict``) and to the ONNX runner, and the same scores."""
    run_dir, model_file = padim_export
    files, upright = _odd_files(tmp_path / "odd")
    data_cfg = json.loads((run_dir / "config.json").read_text())["data"]
    dataset = AnomalyDataset([Sample(path, 0, "odd") for path in files.values()], data_cfg)
    detector = OnnxDetector(model_file)
    for index, (name, path) in enumerate(files.items()):
        trained_on = dataset.load_image(index).permute(1, 2, 0).numpy()
        assert np.array_equal(detector.load(path), trained_on), name
    gray16 = dataset.load_image(0).float().mean().item()
    assert abs(gray16 - np.linspace(0, 255, 100).mean()) < 8  # the gradient's grey, not Pillow's clipped white
    assert np.array_equal(detector.load(files["exif_rotated"]), detector.preprocess(Image.fromarray(upright)))
    deployed = predict_onnx(model_file, tmp_path / "odd", tmp_path / "onnx")
    reference = predict(run_dir, tmp_path / "odd", tmp_path / "torch")
    assert not deployed["skipped"] and not reference["skipped"]
    np.testing.assert_allclose([row["score"] for row in deployed["rows"]], [row["score"] for row in reference["rows"]],
                               rtol=RELATIVE_TOLERANCE)
    for folder in ("onnx", "torch"):
        assert Image.open(tmp_path / folder / "exif_rotated_overlay.png").size == (80, 60)


# -- bad input: one line each ---------------------------------------------------------------------------
def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_export_refusals_are_one_line(padim_export, tmp_path, capsys):
    run_dir, model_file = padim_export
    assert "Unknown export format 'tflite'" in _error_line(capsys, ["export", "--checkpoint", str(run_dir), "--format", "tflite"])
    before = model_file.stat().st_mtime_ns
    assert "exists: pass --force" in _error_line(capsys, ["export", "--checkpoint", str(run_dir), "--format", "onnx"])
    assert model_file.stat().st_mtime_ns == before  # untouched
    assert main(["export", "--checkpoint", str(run_dir), "--format", "onnx", "--force"]) == 0
    assert model_file.stat().st_mtime_ns != before
    capsys.readouterr()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({key: value for key, value in saved.items() if key != "format_version"}, old)
    assert "format_version None" in _error_line(capsys, ["export", "--checkpoint", str(old), "--format", "onnx"])
    state = dict(saved["model"])
    state.pop(next(iter(state)))
    torch.save({**saved, "model": state}, old)
    assert "older version of this framework" in _error_line(capsys, ["export", "--checkpoint", str(old), "--format", "onnx",
                                                                   "--output", str(tmp_path / "m.onnx")])
    assert "not found" in _error_line(capsys, ["predict", "--model-file", str(tmp_path / "none.onnx"), "--input", "."])


def test_export_without_the_extra_names_it(padim_export, monkeypatch):
    run_dir, _ = padim_export
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(FrameworkError, match=r"needs the 'onnxruntime' package: pip install -e \"\.\[export\]\""):
        export(run_dir, "onnx", run_dir / "other.onnx")
