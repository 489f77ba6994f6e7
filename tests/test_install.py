"""The package as a user installs it: a wheel holding every module, installed without ``-e`` into a fresh
virtualenv and run from another folder; one module object per module (a notebook's config edit takes
effect); a user's own ``config.py``, ``utils.py`` or ``models/`` neither shadows nor is shadowed."""
import importlib.metadata
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from anomaly_framework import config
from anomaly_framework.inference.checkpoint import load_checkpoint
from anomaly_framework.main import run_experiment

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "anomaly_framework").rglob("*.py"))


def module_names() -> list[str]:
    names = []
    for file in PACKAGE_FILES:
        parts = Path(file).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [name for name in names if not name.endswith("__main__")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(folder)]
    if int(importlib.metadata.version("setuptools").split(".")[0]) >= 68:  # else pip fetches it to build
        build.insert(5, "--no-build-isolation")
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(folder.glob("anomaly_framework-*.whl"))


def test_wheel_holds_every_module_and_the_console_command(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(name for name in names if name.endswith(".py")) == PACKAGE_FILES
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "anomaly-framework = anomaly_framework.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installed_without_editable_imports_every_module_and_runs_the_demo(wheel, tmp_path, demo_root):
    """A fresh virtualenv, used from a folder outside the repository: the framework only from the wheel;
    torch & co. from this interpreter's site-packages, listed in a .pth file (whose own .pth files, among
    them any editable install of the framework, are therefore not run)."""
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(purelib, "outer_packages.pth").write_text("".join(f"{path}\n" for path in outer))
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = textwrap.dedent(f"""
        import importlib, anomaly_framework
        assert anomaly_framework.__file__.startswith({str(environment)!r}), anomaly_framework.__file__
        for name in {module_names()!r}:
            importlib.import_module(name)
        print("imported", len({module_names()!r}))
    """)
    imported = subprocess.run([str(python), "-c", script], cwd=work, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert f"imported {len(module_names())}" in imported.stdout
    # The README's demo command, through the installed console command (the demo data already generated).
    command = [str(environment / "bin" / "anomaly-framework"), "--model", "padim", "--dataset", "demo",
               "--backbone", "efficientnet_lite0", "--data-root", str(demo_root), "--output-dir", str(work / "runs")]
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = Path(run.stdout.strip().splitlines()[-1])
    assert (run_dir / "results.json").is_file() and run_dir.is_relative_to(work / "runs")


@pytest.mark.parametrize("launcher", [["-m", "anomaly_framework"], [str(ROOT / "main.py")]], ids=["module", "root"])
def test_both_launchers_answer_help_from_any_folder(launcher, tmp_path):
    done = subprocess.run([sys.executable, *launcher, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout and "Train and evaluate an anomaly detector" in done.stdout


def test_editing_a_config_dict_then_rerunning_takes_effect(monkeypatch, tmp_path, demo_root):
    """The design's notebook usage: one module object, so the edit reaches the run."""
    monkeypatch.setitem(config.MODEL_CONFIGS["padim"]["model"], "n_features", 5)
    results = run_experiment({"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                              "data.name": "demo", "data.root": str(demo_root), "data.image_size": 32,
                              "eval.num_figures": 0, "output_dir": str(tmp_path)})
    assert results["config"]["model"]["n_features"] == 5
    modeler, _ = load_checkpoint(results["run_dir"])
    assert modeler.model.feature_index.numel() == 5


def test_a_users_own_config_utils_and_models_do_not_shadow_the_framework(tmp_path, demo_root):
    (tmp_path / "config.py").write_text("USER_CONFIG = True\n")
    (tmp_path / "utils.py").write_text("def resolve_config(*args):\n    raise RuntimeError('user utils')\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("USER_MODELS = True\n")
    script = textwrap.dedent(f"""
        import sys
        from anomaly_framework.main import run_experiment
        results = run_experiment({{"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                                  "data.name": "demo", "data.root": {str(demo_root)!r}, "data.image_size": 32,
                                  "output_dir": {str(tmp_path / "runs")!r}, "eval.num_figures": 0}})
        import config, utils, models
        assert config.USER_CONFIG and models.USER_MODELS and utils.resolve_config.__module__ == "utils"
        leaked = sorted({{"main", "registry", "trainers", "dataloaders", "modelers", "metrics"}} & set(sys.modules))
        assert not leaked, leaked
        print("image_auroc", results["metrics"]["image_auroc"])
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stderr[-3000:]
    assert "image_auroc" in process.stdout
