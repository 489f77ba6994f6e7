"""Install hygiene: the installed framework is one top-level name, ``anomaly_framework``, so a notebook
folder with its own ``config.py``, ``utils.py`` or ``models/`` neither breaks it nor is broken by it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_one_package_and_no_top_level_modules():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"] == ["anomaly_framework"]
    assert "py-modules" not in setuptools


def test_a_users_own_config_utils_and_models_do_not_shadow_the_framework(tmp_path, demo_root):
    """The editable install maps the name ``anomaly_framework`` to its folder; the subprocess does the
    same (and nothing more), from a folder holding modules named like the framework's."""
    (tmp_path / "config.py").write_text("USER_CONFIG = True\n")
    (tmp_path / "utils.py").write_text("def resolve_config(*args):\n    raise RuntimeError('user utils')\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("USER_MODELS = True\n")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "anomaly_framework", {str(ROOT / "anomaly_framework" / "__init__.py")!r},
            submodule_search_locations=[])
        package = importlib.util.module_from_spec(spec)
        sys.modules["anomaly_framework"] = package
        spec.loader.exec_module(package)
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
                             timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "image_auroc" in process.stdout
