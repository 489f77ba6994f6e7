"""A model of your own: the README's plugin example, extracted from README.md and run as written, through
the CLI (``--plugin``) and ``run_experiment``; its scores checked against scikit-learn's nearest neighbours."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from anomaly_framework import config
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.cli import main
from anomaly_framework.main import run_experiment
from anomaly_framework.factories import build_dataloader
from anomaly_framework.registry import MODEL_REGISTRY, MODELER_REGISTRY
from anomaly_framework.errors import FrameworkError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first Python block of the README's "A model of your own" section."""
    section = README.read_text().split("### A model of your own", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """The example as ``knn_detector.py``; registrations and the imported module are undone afterwards."""
    for registry in (MODEL_REGISTRY, MODELER_REGISTRY):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(config, "MODEL_CONFIGS", dict(config.MODEL_CONFIGS))
    path = tmp_path / "knn_detector.py"
    path.write_text(readme_example())
    yield path
    sys.modules.pop("knn_detector", None)


def test_the_readme_example_runs_from_the_cli_and_run_experiment(plugin_file, tmp_path, demo_root, capsys):
    flags = ["--dataset", "demo", "--data-root", str(demo_root), "--backbone", "resnet18", "--image-size", "32",
             "--output-dir", str(tmp_path / "runs"), "--set", "model.pretrained=false", "--set", "model.k=3",
             "--set", "eval.num_figures=0"]
    assert main(["--plugin", str(plugin_file), "--model", "knn", *flags]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    from_cli = json.loads((run_dir / "results.json").read_text())

    again = run_experiment({"plugins": [str(plugin_file)], "model.name": "knn", "data.name": "demo",
                            "data.root": str(demo_root), "model.backbone": "resnet18", "data.image_size": 32,
                            "output_dir": str(tmp_path / "runs"), "model.pretrained": False, "model.k": 3,
                            "eval.num_figures": 0})
    assert again["metrics"] == from_cli["metrics"]
    assert again["config"]["plugins"] == [str(plugin_file.resolve())]  # saved: the checkpoint re-imports it

    # The fitted model, rebuilt from the checkpoint alone: a bank of every training patch, and patch
    # scores equal to the mean distance to the 3 nearest bank entries by scikit-learn.
    modeler, checkpoint = load_checkpoint(run_dir)
    model = modeler.model
    assert tuple(model.bank.shape) == (40 * 4 * 4, 128)  # 40 training images, a 4×4 grid at stride 8, 128 channels
    test = next(iter(build_dataloader(again["config"]).test_loader()))
    with torch.no_grad():
        patch_scores = model(test["image"])["patch_scores"]
        patches = model.patches(test["image"]).flatten(0, 2).numpy()
    distances, _ = NearestNeighbors(n_neighbors=3).fit(model.bank.numpy()).kneighbors(patches)
    assert np.allclose(patch_scores.flatten().numpy(), distances.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path, capsys):
    assert main(["--plugin", "no_such_module_xyz", "--model", "knn"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Cannot import plugin 'no_such_module_xyz'" in error
    assert "ModuleNotFoundError" in error
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("from anomaly_framework.config import register_model_config\nregister_model_config('padim', {})\n")
    assert main(["--plugin", str(broken), "--model", "padim"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Model 'padim' is built in" in error and "broken_plugin.py" in error
    assert "broken_plugin" not in sys.modules


def test_a_plugin_by_module_name_brings_its_defaults_and_family(plugin_file, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    resolved = config.resolve_config({"plugins": ["knn_detector"], "model.name": "knn", "model.k": 2})
    assert resolved["plugins"] == ["knn_detector"] and resolved["train"]["trainer"] == "memory"
    assert resolved["model"] == {"name": "knn", "backbone": "resnet18", "layers": [2], "pretrained": True,
                                 "weights": None, "k": 2, "sigma": 4.0, "backbone_runtime": "torch"}
    assert resolved["data"]["image_size"] == 224 and resolved["data"]["crop_ratio"] == 0.875
    with pytest.raises(FrameworkError, match="Unknown config key 'model.neighbours'"):
        config.resolve_config({"model.name": "knn", "model.neighbours": 2})


def test_a_plugin_memory_model_is_calibrated_cross_fitted_not_in_sample(plugin_file, tmp_path, demo_root):
    """The README's kNN cannot leave one image out: its threshold comes from 5 fold models, each fitted on the
    images of the other folds (re-done here by hand); the saved model is still the fit of all 40 images."""
    settings = {"plugins": [str(plugin_file)], "model.name": "knn", "data.name": "demo", "data.root": str(demo_root),
                "model.backbone": "resnet18", "data.image_size": 32, "output_dir": str(tmp_path / "runs"),
                "model.pretrained": False, "model.k": 1, "eval.num_figures": 0}
    with pytest.warns(UserWarning, match="cannot be certified"):
        results = run_experiment(settings)
    metrics = results["metrics"]
    assert metrics["threshold_source"].endswith("scores of train/good, 5-fold cross-fitted (40 images)")
    modeler, _ = load_checkpoint(Path(results["run_dir"]))
    assert tuple(modeler.model.bank.shape) == (40 * 4 * 4, 128)
    images = torch.stack([item["image"] for item in build_dataloader(results["config"]).train_dataset])
    scores = []
    with torch.inference_mode():
        for fold in range(5):
            kept = [i for i in range(40) if i % 5 != fold]
            modeler.model.begin_fit(len(kept))
            modeler.model.update(images[kept])
            modeler.model.finalize()
            scores.append(modeler.compute_anomaly_scores(images[fold::5]))
            in_sample = modeler.compute_anomaly_scores(images[kept])
    assert metrics["threshold"] == pytest.approx(float(torch.cat(scores).max()), rel=1e-5)  # 40 images: rank 40
    assert metrics["threshold"] > float(in_sample.max())
