"""Config merge order, overrides and refusals; registry errors."""
import pytest

from anomaly_framework.config import BASE_CONFIGS, MODEL_CONFIGS, TRAIN_CONFIGS, default_config, resolve_config
from anomaly_framework.config_checks import NULLABLE_TYPES
from anomaly_framework.registry import MODEL_REGISTRY, Registry
from anomaly_framework import factories  # noqa: F401  (registers the built-in parts)
from anomaly_framework.errors import FrameworkError


def _leaves(section, prefix=""):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("model", sorted(MODEL_CONFIGS))
def test_every_model_resolves_and_none_defaults_are_typed(model):
    config = resolve_config({"model.name": model, "data.name": "mvtec"})
    assert config["model"]["name"] == model
    assert config["train"]["trainer"] in TRAIN_CONFIGS
    for key, value in _leaves(config):
        if value is None:
            assert key in NULLABLE_TYPES, f"{key} defaults to None but has no declared type"


def test_merge_order_model_recipe_wins_over_base_and_data():
    config = default_config("padim", "mvtec")
    assert config["data"]["category"] == "bottle"  # from DATA_CONFIGS
    assert config["data"]["interpolation"] == "lanczos"  # model recipe over BASE
    assert BASE_CONFIGS["data"]["interpolation"] == "bilinear"


def test_overrides_nested_and_dotted_agree():
    nested = resolve_config({"model": {"name": "padim", "sigma": 2}, "data": {"name": "mvtec", "batch_size": 4}})
    dotted = resolve_config({"model.name": "padim", "model.sigma": 2, "data.name": "mvtec", "data.batch_size": 4})
    assert nested == dotted
    assert nested["model"]["sigma"] == 2.0 and isinstance(nested["model"]["sigma"], float)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"model.nope": 1}, "model.nope"),
        ({"data.batch_size": "8"}, "data.batch_size"),
        ({"data.batch_size": True}, "data.batch_size"),
        ({"model.name": "padim", "model.pretrained": "yes"}, "model.pretrained"),
        ({"data.root": 3}, "data.root"),
        ({"model.name": "nosuchmodel"}, "nosuchmodel"),
        ({"data.name": "nosuchdata"}, "nosuchdata"),
        ({"data": 5}, "'data'"),
        ({"data.crop_ratio": 1.5}, "data.crop_ratio"),
        ({"device": "tpu"}, "device"),
        ({"model.name": "stfpm", "train.monitor": "accuracy"}, "train.monitor"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(FrameworkError, match=fragment.replace(".", r"\.")):
        resolve_config(overrides)


def test_registry_refuses_duplicates_and_lists_known_names():
    registry = Registry("widget", "anything")
    registry.register("a")(object)
    with pytest.raises(ValueError):
        registry.register("a")(dict)
    rerun = type("object", (), {"__module__": "builtins"})  # a notebook cell run again: same name and module
    assert registry.register("a")(rerun) is rerun and registry.get("a") is rerun
    with pytest.raises(FrameworkError, match="known widgets are a"):
        registry.get("b")


def test_every_configured_model_is_registered():
    assert set(MODEL_CONFIGS) <= set(MODEL_REGISTRY.names())


def test_model_seeds_follow_the_run_seed_unless_set():
    assert resolve_config({"model.name": "padim", "seed": 3})["model"]["feature_seed"] == 3
    assert resolve_config({"model.name": "patchcore", "seed": 5})["model"]["coreset_seed"] == 5
    pinned = resolve_config({"model.name": "patchcore", "seed": 5, "model.coreset_seed": 0})
    assert pinned["model"]["coreset_seed"] == 0
