"""Checks of a config that its defaults cannot express: the type a set value must have, values that are
well typed but meaningless, and keys that do not apply to the chosen model."""
from __future__ import annotations

import importlib.util
from typing import Any

from anomaly_framework.errors import FrameworkError

MONITORS = ("loss", "synthetic_pixel_auroc", "normal_map_mean")
KEEPS = ("best", "last")
THRESHOLD_STRATEGIES = ("false_alarm_rate", "normal_quantile", "f1_adaptive", "manual")
NATIVE = "native"  # data.image_size: each file read at its own size (tiled runs only)

# Keys whose default is None, with the type a set value must have.
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    "data.category": (str,),
    "data.root": (str,),
    "data.mask_size": (int, str),
    "data.num_workers": (int,),
    "data.tile_size": (int,),
    "data.tile_stride": (int,),
    "data.cache_dir": (str,),
    "model.weights": (str,),
    "model.n_features": (int,),
    "train.resume": (str,),
    "model.flow_steps": (int,),
    "model.hidden_ratio": (float, int),
    "model.conv3x3_only": (bool,),
    "model.vit_block_index": (int,),
    "train.texture_root": (str,),
    "eval.threshold_value": (float, int),
    "model.feature_seed": (int,),
    "model.tile_ensemble": (bool,),
    "model.coreset_seed": (int,),
    "model.recompute_activations": (bool,),
    "model.reflect_padding": (bool,),
    **{f"data.{key}": (str,) for key in ("train_dir", "test_normal_dir", "test_abnormal_dir", "mask_dir", "valid_dir")},
}


def check_value(path: str, default: Any, value: Any) -> Any:
    """Returns ``value`` (ints widened to float where a float is expected) or refuses it naming the key."""
    if path == "data.image_size" and value == NATIVE:
        return value
    if default is None:
        allowed = NULLABLE_TYPES.get(path)
        if value is None or allowed is None:
            return value
        if isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)):
            return float(value) if float in allowed and not isinstance(value, bool) else value
        expected = " or ".join(t.__name__ for t in allowed)
        raise FrameworkError(f"Config key '{path}' must be {expected} or null, got {type(value).__name__} {value!r}")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise FrameworkError(
            f"Config key '{path}' must be {type(default).__name__} (default {default!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def refuse_epoch_keys_of_one_pass_models(config: dict, train: dict) -> None:
    """``--resume`` or ``--epochs`` for PaDiM or PatchCore: say why, rather than 'Unknown config key'."""
    for key in ("resume", "epochs", "keep_training_state"):
        if key in train and key not in config["train"]:
            why = ("memory models have nothing to resume: run it again without --resume" if key == "resume"
                   else f"it has no epochs and no training state, so train.{key} does not apply")
            raise FrameworkError(f"{config['model']['name']} is fitted in one pass over the training images "
                                 f"({config['train']['trainer']} trainer): {why}")


def check_consistency(config: dict) -> None:
    """Refuses values that are individually well typed but meaningless."""
    data = config["data"]
    if not 0.0 < data["crop_ratio"] <= 1.0:
        raise FrameworkError(f"Config key 'data.crop_ratio' must be in (0, 1], got {data['crop_ratio']}")
    if not 0.0 <= data["val_fraction"] < 1.0:
        raise FrameworkError(f"Config key 'data.val_fraction' must be in [0, 1), got {data['val_fraction']}")
    if isinstance(data["mask_size"], str) and data["mask_size"] != "native":
        raise FrameworkError(f"Config key 'data.mask_size' must be an int, \"native\" or null, got {data['mask_size']!r}")
    if isinstance(data["mask_size"], int) and data["mask_size"] <= 0:
        raise FrameworkError(f"Config key 'data.mask_size' must be positive, got {data['mask_size']}")
    for key in ("image_size", "batch_size"):
        if data[key] != NATIVE and data[key] <= 0:
            raise FrameworkError(f"Config key 'data.{key}' must be positive, got {data[key]}")
    check_tiling(data)
    check_native(config)
    check_tile_ensemble(config)
    if data["num_workers"] is not None and data["num_workers"] < 0:
        raise FrameworkError(f"Config key 'data.num_workers' must be >= 0 or null (auto), got {data['num_workers']}")
    if config["device"] not in ("auto", "cpu", "cuda"):
        raise FrameworkError(f"Config key 'device' must be auto, cpu or cuda, got {config['device']!r}")
    if "epochs" in config["train"] and config["train"]["epochs"] < 1:
        raise FrameworkError(f"Config key 'train.epochs' (--epochs) must be at least 1, got {config['train']['epochs']}")
    for section, key, least in (("train", "sub_epochs", 1), ("train", "warmup_meta_epochs", 0),
                                ("model", "coupling_blocks", 1), ("model", "fiber_batch", 1)):  # CFlow's counts
        if key in config[section] and config[section][key] < least:
            raise FrameworkError(f"Config key '{section}.{key}' must be at least {least}, got {config[section][key]}")
    monitor = config["train"].get("monitor", "loss")
    if monitor not in MONITORS:
        raise FrameworkError(f"Config key 'train.monitor' must be one of {', '.join(MONITORS)}, got {monitor!r}")
    keep = config["train"].get("keep", "best")
    if keep not in KEEPS:
        raise FrameworkError(f"Config key 'train.keep' must be one of {', '.join(KEEPS)}, got {keep!r}")
    if config["train"].get("tensorboard") and importlib.util.find_spec("tensorboard") is None:
        raise FrameworkError("train.tensorboard=true needs the tensorboard package: "
                             "pip install 'anomaly-framework[tensorboard]'")
    evaluation = config["eval"]
    if not 0.0 <= evaluation["threshold_quantile"] <= 1.0:
        raise FrameworkError("Config key 'eval.threshold_quantile' must be in [0, 1]")
    for key in ("false_alarm_rate", "false_alarm_confidence"):
        if not 0.0 < evaluation[key] < 1.0:
            raise FrameworkError(f"Config key 'eval.{key}' must be in (0, 1) (exclusive), got {evaluation[key]}")
    if evaluation["threshold_strategy"] not in THRESHOLD_STRATEGIES:
        raise FrameworkError(f"Config key 'eval.threshold_strategy' must be one of {', '.join(THRESHOLD_STRATEGIES)}, "
                             f"got {evaluation['threshold_strategy']!r}")
    if evaluation["threshold_strategy"] == "manual" and evaluation["threshold_value"] is None:
        raise FrameworkError("eval.threshold_strategy=manual needs eval.threshold_value (e.g. --set eval.threshold_value=0.5)")
    if not 0.0 <= data["labelled_val_fraction"] < 1.0:
        raise FrameworkError(f"Config key 'data.labelled_val_fraction' must be in [0, 1), got {data['labelled_val_fraction']}")


def check_tiling(data: dict) -> None:
    """Tile settings the grid cannot use (the model's own limits are checked once it is built)."""
    size, stride = data["tile_size"], data["tile_stride"]
    if size is None:
        if stride is not None:
            raise FrameworkError(f"Config key 'data.tile_stride'={stride} needs data.tile_size (the tiles' side)")
        return
    if not 0 < size <= (size if data["image_size"] == NATIVE else data["image_size"]):  # native: per file, when read
        raise FrameworkError(f"Config key 'data.tile_size' must be in 1..data.image_size={data['image_size']} "
                             f"(the image is read at image_size and cut into tiles), got {size}")
    if stride is not None and not 0 < stride <= size:
        raise FrameworkError(f"Config key 'data.tile_stride' must be in 1..data.tile_size={size} "
                             f"(a larger step would leave pixels without a tile), got {stride}")


def check_native(config: dict) -> None:
    """``data.image_size=native`` needs tiles (models take one fixed input size) and evaluates at the files' own size."""
    data = config["data"]
    if data["image_size"] != NATIVE:
        return
    if data["tile_size"] is None:
        raise FrameworkError("Config key 'data.image_size'=native needs data.tile_size: models take a fixed input "
                             "size, so images of their own sizes must be cut into tiles (e.g. --set data.tile_size=224)")
    if data["mask_size"] not in (None, NATIVE):
        raise FrameworkError(f"Config key 'data.mask_size'={data['mask_size']!r} does not apply with data.image_size=native "
                             "(maps and masks are at each file's own size): leave it unset or native")
    if config["train"].get("monitor") == "synthetic_pixel_auroc":
        raise FrameworkError("Config key 'train.monitor'=synthetic_pixel_auroc needs square images (its textures are "
                             "data.image_size squares): not with data.image_size=native")


def check_tile_ensemble(config: dict) -> None:
    """PaDiM's tiled ensemble fits one Gaussian set per tile position: it needs tiles, on one grid for every image."""
    data = config["data"]
    if not config["model"].get("tile_ensemble"):
        return
    if data["tile_size"] is None:
        raise FrameworkError("Config key 'model.tile_ensemble'=true needs data.tile_size (it fits one Gaussian set per "
                             "tile position), e.g. --set data.tile_size=224")
    if data["image_size"] == NATIVE:
        raise FrameworkError("Config key 'model.tile_ensemble'=true needs the same tile positions in every image: "
                             "not with data.image_size=native (set an image_size, or leave the ensemble off)")
