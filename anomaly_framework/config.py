"""Plain-dict configuration: defaults per dataset, per model family and per model, merged in a fixed order.

Merge order (later wins):
    BASE_CONFIGS < DATA_CONFIGS[data.name] < TRAIN_CONFIGS[train.trainer] < MODEL_CONFIGS[model.name] < overrides
The model's entry comes after its family's so that a paper's own recipe (STFPM's SGD lr 0.4, DRAEM's
batch 8) wins over the family defaults. Overrides are nested dicts or dotted keys (``{"train.lr": 0.1}``).
Every override must name a key that exists in the merged defaults and carry a value of its type.
"""
from __future__ import annotations

import copy
from typing import Any

from anomaly_framework.config_checks import NATIVE, check_consistency, check_value, refuse_epoch_keys_of_one_pass_models
from anomaly_framework.config_overrides import SCOPE_SEPARATOR, deep_merge, expand_dotted, split_scoped
from anomaly_framework.errors import FrameworkError
from anomaly_framework.factories import load_plugins

BASE_CONFIGS: dict[str, Any] = {
    "plugins": [],  # a researcher's modules (names or .py paths) imported first: they register models
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda
    "output_dir": "experiments",
    "data": {
        "name": "demo",
        "category": None,
        "root": None,  # else the dataset's environment variable (MVTEC_ROOT, VISA_ROOT, BTAD_ROOT, ANOMALY_DEMO_ROOT)
        "image_size": 224,  # side of the model input; "native" = each file at its own size (tiled runs only)
        "crop_ratio": 0.875,  # resize to image_size / crop_ratio, then centre-crop; 1.0 = plain resize
        "interpolation": "bilinear",  # bilinear | bicubic | lanczos (masks always nearest)
        "normalize": "imagenet",  # imagenet | none
        "batch_size": 32,
        # DataLoader worker processes decoding images beside the model; None = auto: 0 on 1-2 cores (workers
        # only contend with the model there, and cached images cost a memory copy), else min(8, cores - 1).
        "num_workers": None,
        "val_fraction": 0.0,  # held-out share of train/good for validation and the threshold
        # Seeded, label-stratified share of the *test* split held out as a labelled validation set for
        # eval.threshold_strategy=f1_adaptive; those images are then excluded from the test metrics.
        "labelled_val_fraction": 0.0,
        # Resolution of the pixel metrics: None = the model input; an int = that square side; "native" =
        # each original image's own size (the MVTec protocol; the centre crop, if any, is not undone).
        # Ground truth always comes from the original mask files.
        "mask_size": None,
        # Each image decoded and resized once per preprocessing into a shared on-disk cache (uint8, read
        # memory-mapped by every run and worker); false = decode on every read.
        "cache": True,
        "cache_dir": None,  # None = $ANOMALY_FRAMEWORK_CACHE, else ~/.cache/anomaly_framework (images/, features/)
        "tile_size": None, "tile_stride": None,  # tiles of the image_size square (None: untiled): high_resolution.md
    },
    # Where frozen backbones (PaDiM, PatchCore, the STFPM and FastFlow teachers...) run: torch | torchscript |
    # onnxruntime | openvino | auto (eager on a GPU, else onnxruntime if installed, else torchscript). Exports
    # are stored under <data.cache_dir>/backbones; features match eager within 1e-5 (backbones/runtimes.py).
    "model": {"name": "padim", "backbone_runtime": "torch"},
    "train": {"trainer": "memory"},
    "eval": {
        # false_alarm_rate: the lowest order statistic of out-of-sample normal scores whose false-alarm
        # rate is <= eval.false_alarm_rate with probability eval.false_alarm_confidence (docs/thresholds.md);
        # normal_quantile: a quantile of the same scores; f1_adaptive: best F1 on the labelled validation
        # set (data.labelled_val_fraction); manual: eval.threshold_value. No anomalies needed but for f1_adaptive.
        "threshold_strategy": "false_alarm_rate",
        "false_alarm_rate": 0.05,  # 1 normal image in 20 flagged; certified from 45 normal images at confidence 0.9
        "false_alarm_confidence": 0.9,
        "threshold_quantile": 1.0,  # normal_quantile only; 1.0 = the maximum normal score
        "threshold_value": None,  # manual only
        "num_figures": 8,  # test images drawn as image | ground truth | heat map | predicted mask
        "save_checkpoint": True,
    },
}

DATA_CONFIGS: dict[str, dict] = {
    "demo": {"data": {"category": "fabric"}},
    "mvtec": {"data": {"category": "bottle"}},
    "visa": {"data": {"category": "candle"}},
    "btad": {"data": {"category": "01"}},
    # Any folders of images (dataloaders/dataloader_folder.py); relative paths are taken under data.root.
    # data.category only names the run folder.
    "folder": {"data": {"category": "custom", "train_dir": None, "test_normal_dir": None, "test_abnormal_dir": None,
                        "mask_dir": None, "valid_dir": None}},
}

_EPOCH_TRAINING = {
    "epochs": 100,
    "optimizer": "adam",  # sgd | adam | adamw
    "lr": 1e-3,
    "momentum": 0.9,  # sgd only
    "betas": [0.9, 0.999],  # adam / adamw only (torch's default)
    "weight_decay": 0.0,
    "scheduler": "none",  # none | multistep | cosine | cflow (CFlow's meta-epoch cosine with warm-up)
    "milestones": [0.8, 0.9],  # multistep: fractions of train.epochs
    "gamma": 0.1,
    "patience": 10,  # epochs without a better monitored value (train.monitor) before stopping
    "min_delta": 0.0,
    "resume": None,  # a run folder holding last.pt
    # last.pt (weights + optimiser state, 3× the weights with Adam) is deleted once a run is done; keep it
    # to extend the run later with train.resume.
    "keep_training_state": False,
    # Early stopping and the best epoch: "loss" = the validation loss; "synthetic_pixel_auroc" = the
    # pixel AUROC on the held-out images with fixed simulated defects (never the test set);
    # "normal_map_mean" = the mean anomaly map over the held-out normal images (STFPM's official rule).
    "monitor": "loss",
    "keep": "best",  # weights evaluated: "best" = the best monitored epoch, "last" = the final epoch
    # Simulated defects' textures (DRAEM's training, the synthetic monitor): a folder in the DTD layout
    # (images/<class>/*.jpg), None = Perlin-derived textures.
    "texture_root": None,
    "tensorboard": False,  # also write TensorBoard scalars (pip install 'anomaly-framework[tensorboard]')
}
# Held-out train/good images for validation and early stopping; decoded images cached across epochs.
_EPOCH_DATA = {"val_fraction": 0.2, "image_size": 256, "crop_ratio": 1.0}
# The frozen backbone's features of each split, computed once per run and kept in memory up to
# feature_cache_mb (0 = recompute on every pass); across runs with the same backbone weights, layers and
# preprocessing they are read back from <data.cache_dir>/features, kept under feature_disk_cache_mb
# (least recently used entries evicted; 0 = no disk copy).
_FEATURE_CACHE = {"feature_cache_mb": 4096, "feature_disk_cache_mb": 8192}

TRAIN_CONFIGS: dict[str, dict] = {
    "memory": {"train": {"trainer": "memory", **_FEATURE_CACHE}},
    "gradient": {"train": {"trainer": "gradient", **_EPOCH_TRAINING}, "data": dict(_EPOCH_DATA)},
    "flow": {"train": {"trainer": "flow", **_EPOCH_TRAINING, **_FEATURE_CACHE}, "data": dict(_EPOCH_DATA)},
    # Trained on simulated anomalies (train.texture_root None: Perlin textures, lower numbers, a warning).
    "classification": {"train": {"trainer": "classification", **_EPOCH_TRAINING},
                       "data": dict(_EPOCH_DATA)},
}

MODEL_CONFIGS: dict[str, dict] = {
    # PaDiM (Defard et al., ICPR-W 2020): xia's reference protocol, LANCZOS resize 256, centre crop 224.
    "padim": {
        "model": {
            "backbone": "wide_resnet50_2.tv_in1k",  # torchvision's V1 weights, as xia's code
            "layers": [1, 2, 3],
            "pretrained": True,
            "weights": None,
            "n_features": None,  # None = paper rule: R18 100, WR50 550, other backbones min(550, all)
            "sigma": 4.0,
            "feature_seed": None,  # seed of the random channel subset; None = the run's seed
            # Tiled runs: one Gaussian set per tile position (True) or one shared by every tile (False); None = on
            # when tiled at a fixed image_size (measured better on bottle), off at image_size native (high_resolution.md)
            "tile_ensemble": None,
        },
        "train": {"trainer": "memory"},
        "data": {"image_size": 224, "crop_ratio": 0.875, "interpolation": "lanczos"},
    },
    # PatchCore (Roth et al., CVPR 2022): official IM224 protocol, resize 256 (bilinear), centre crop 224.
    "patchcore": {
        "model": {
            "backbone": "wide_resnet50_2.tv_in1k",  # torchvision's V1 weights, as the official code
            "layers": [2, 3],
            "pretrained": True,
            "weights": None,
            "patch_size": 3,
            "pre_embed_dim": 1024,
            "embed_dim": 1024,
            "coreset_ratio": 0.1,
            "projection_dim": 128,
            "num_start_points": 10,
            "coreset_seed": None,  # seed of the projection and start points; None = the run's seed
            "score_mode": "reweighted",  # paper eq. 7 (b=9); "max" = the official code
            "num_neighbors": 9,
            "sigma": 4.0,
            "bank_dtype": "float32",
            "memory_budget_mb": 8192.0,
            "chunk_mb": 64.0,
            # True replays the official code's batch-norm side effect (one all-ones image through the
            # backbone in training mode before extraction), for exact reproduction of its numbers.
            "official_batchnorm_pass": False,
        },
        "train": {"trainer": "memory"},
        "data": {"image_size": 224, "crop_ratio": 0.875, "interpolation": "bilinear", "batch_size": 8},
    },
    # STFPM (Wang et al., BMVC 2021): official code's recipe; 20% of train/good held out, and the
    # epoch with the lowest mean anomaly map over them is kept (official rule; patience = epochs).
    "stfpm": {
        "model": {"backbone": "resnet18.tv_in1k", "layers": [1, 2, 3], "pretrained": True, "weights": None},
        "train": {"trainer": "gradient", "epochs": 100, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9,
                  "weight_decay": 1e-4, "patience": 100, "monitor": "normal_map_mean"},
        "data": {"image_size": 256, "crop_ratio": 1.0, "batch_size": 32, "val_fraction": 0.2},
    },
    # Reconstruction baselines (Bergmann et al., VISAPP 2019 settings): images in [0, 1], Adam 2e-4,
    # weight decay 1e-5. Simplification: whole 256×256 images rather than random 128×128 crops.
    **{
        name: {
            "model": {"base_channels": 32, **extra, "loss": "l2+ssim", "map_kind": "l2", "sigma": 4.0},
            "train": {"trainer": "gradient", "epochs": 200, "optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5,
                      "patience": 20},
            "data": {"image_size": 256, "crop_ratio": 1.0, "normalize": "none", "batch_size": 32},
        }
        for name, extra in {
            "ae": {"latent_dim": 100},
            "unet_ae": {"depth": 4},
            "vae": {"latent_dim": 100, "beta": 1.0},
            "unet_vae": {"depth": 4, "beta": 1.0},
        }.items()
    },
    # FastFlow (Yu et al., 2021) as gathierry/FastFlow: 256 px, Adam 1e-3 / wd 1e-5, batch 32, 500 epochs,
    # the last epoch kept (resnet18: its timm's torchvision weights).
    # Transformers as the paper: --backbone deit_base_distilled_patch16_384.fb_in1k --image-size 384 (or
    # cait_m48_448.fb_dist_in1k, 448); WR50 as the official code's timm 0.5.4: wide_resnet50_2.racm_in1k.
    "fastflow": {
        "model": {"backbone": "resnet18.tv_in1k", "layers": [1, 2, 3], "pretrained": True, "weights": None,
                  "flow_steps": None, "hidden_ratio": None, "conv3x3_only": None, "clamp": 2.0,
                  "vit_block_index": None},
        "train": {"trainer": "flow", "epochs": 500, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5,
                  "patience": 500, "keep": "last"},
        # The paper trains on every train/good image and sets no threshold; 20 % is held out for one (and the
        # validation curve): --set data.val_fraction=0 trains on all, with an in-sample threshold (warned).
        "data": {"image_size": 256, "crop_ratio": 1.0, "batch_size": 32, "val_fraction": 0.2},
    },
    # CFlow-AD (Gudovskiy et al., WACV 2022) as gudovskiy/cflow-ad b2ebf9e (config.py, main.py, train.py):
    # WR50 (torchvision weights, reflection-padded as its custom_models/resnet.py), pool layers 3, 8 coupling
    # blocks, clamp 1.9, condition 128, N = 256 fibers per step; 256 px (LANCZOS, no crop), training images
    # rotated ±5°; Adam 2e-4, batch 32, 25 meta-epochs × 8 sub-epochs (our epochs), cosine per meta-epoch
    # to lr·1e-3 with a 2-meta-epoch warm-up from lr/10; the last epoch kept (the official reports its
    # best test epoch). 20 % of train/good held out for the threshold, as FastFlow.
    "cflow": {
        "model": {"backbone": "wide_resnet50_2.tv_in1k", "layers": [2, 3, 4], "pretrained": True, "weights": None,
                  "coupling_blocks": 8, "clamp": 1.9, "condition_dim": 128, "fiber_batch": 256,
                  "rotation_degrees": 5.0, "reflect_padding": None},
        "train": {"trainer": "flow", "epochs": 200, "optimizer": "adam", "lr": 2e-4, "weight_decay": 0.0,
                  "scheduler": "cflow", "sub_epochs": 8, "warmup_meta_epochs": 2, "patience": 200, "keep": "last"},
        "data": {"image_size": 256, "crop_ratio": 1.0, "interpolation": "lanczos", "batch_size": 32,
                 "val_fraction": 0.2},
    },
    # DRAEM (Zavrtanik et al., ICCV 2021) as the official code: 256 px in [0, 1], Adam 1e-4, batch 8,
    # 700 epochs, MultiStepLR at 0.8·E and 0.9·E with γ 0.2, the last epoch kept.
    # The paper's schedule instead: --set train.milestones=[0.5715,0.8572] --set train.gamma=0.1 (epochs 400, 600).
    "draem": {
        # recompute_activations: null = on the CPU only (same gradients, about a third of the memory).
        "model": {"reconstructive_width": 128, "discriminative_width": 64, "focal_gamma": 2.0, "score_filter": 21,
                  "recompute_activations": None},
        "train": {"trainer": "classification", "epochs": 700, "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0,
                  "scheduler": "multistep", "milestones": [0.8, 0.9], "gamma": 0.2, "patience": 700, "keep": "last"},
        # 20 % of train/good held out for the threshold, as FastFlow (the official code trains on all of it).
        "data": {"image_size": 256, "crop_ratio": 1.0, "normalize": "none", "batch_size": 8, "val_fraction": 0.2},
    },
    # Reverse Distillation (Deng & Li, CVPR 2022) as hq-deng/RD4AD main.train / test.evaluation: WR50
    # encoder (torchvision V1 weights), 256 px (no crop), Adam lr 0.005 betas (0.5, 0.999), batch 16, 200
    # epochs, the last epoch kept (the code saves every 10 epochs, the last at 200); map σ 4, score max.
    "reverse_distillation": {
        "model": {"backbone": "wide_resnet50_2.tv_in1k", "layers": [1, 2, 3], "pretrained": True, "weights": None,
                  "sigma": 4.0},
        "train": {"trainer": "gradient", "epochs": 200, "optimizer": "adam", "lr": 0.005, "betas": [0.5, 0.999],
                  "weight_decay": 0.0, "patience": 200, "keep": "last"},
        # 20 % of train/good held out for the threshold, as FastFlow (the official code trains on all of it).
        "data": {"image_size": 256, "crop_ratio": 1.0, "batch_size": 16, "val_fraction": 0.2},
    },
    # DFM (Ahuja et al., 2019) as anomalib 2.7.0's DFM (the reference others compare against): timm's resnet50
    # (its default weights), layer3, average pooling 4, PCA to 0.97 of the variance, score "fre", 256 px.
    "dfm": {
        "model": {"backbone": "resnet50", "layers": [3], "pretrained": True, "weights": None,
                  "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
        "train": {"trainer": "memory"},
        "data": {"image_size": 256, "crop_ratio": 1.0, "interpolation": "bilinear"},
    },
    # SimpleNet (Liu et al., CVPR 2023) as DonaldRR/SimpleNet's run.sh (351a2b8): torchvision WR50 layer2+3,
    # patch 3, 1536/1536, one linear adaptor (pre_proj 1, AdamW lr·0.1 = 1e-4, AdamW's default decay 0.01),
    # discriminator 2 layers × 1024 (Adam 2e-4, decay 1e-5, no cosine), noise σ 0.015, margin 0.5,
    # batch 8, resize 329 + centre crop 288, meta_epochs 40 × gan_epochs 4 = 160 epochs. The official code
    # keeps the meta-epoch with the best *test* AUROC; here the last epoch is kept and 20 % of train/good
    # is held out for the threshold (docs/models.md).
    "simplenet": {
        "model": {"backbone": "wide_resnet50_2.tv_in1k", "layers": [2, 3], "pretrained": True, "weights": None,
                  "patch_size": 3, "pre_embed_dim": 1536, "embed_dim": 1536, "adaptor_layers": 1,
                  "discriminator_layers": 2, "discriminator_hidden": 1024, "noise_std": 0.015, "margin": 0.5,
                  "sigma": 4.0},
        "train": {"trainer": "gradient", "epochs": 160, "optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5,
                  "adaptor_lr": 1e-4, "adaptor_weight_decay": 0.01, "scheduler": "none", "patience": 160,
                  "keep": "last"},
        "data": {"image_size": 288, "crop_ratio": 288 / 329, "batch_size": 8, "val_fraction": 0.2},
    },
    # SuperSimpleNet (Rolih et al., ICPR 2024), unsupervised MVTec setting of blaz-r/SuperSimpleNet's
    # train.py (60d1e74): torchvision WR50 layer2+3, 256×256, batch 32, 300 epochs, AdamW (adaptor 1e-4 with
    # decay 0.01; heads 2e-4 with decay 1e-5), MultiStepLR at 0.8·E and 0.9·E with γ 0.4, noise σ 0.015,
    # Perlin threshold 0.2 (VisA: 0.6), stop_grad, no gradient clipping, the last epoch kept.
    "supersimplenet": {
        "model": {"backbone": "wide_resnet50_2.tv_in1k", "layers": [2, 3], "pretrained": True, "weights": None,
                  "patch_size": 3, "seg_hidden": 1024, "cls_channels": 128, "cls_kernel": 5, "noise_std": 0.015,
                  "perlin_threshold": 0.2, "margin": 0.5, "focal_gamma": 4.0, "stop_grad": True, "sigma": 4.0},
        "train": {"trainer": "gradient", "epochs": 300, "optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-5,
                  "adaptor_lr": 1e-4, "adaptor_weight_decay": 0.01, "scheduler": "multistep",
                  "milestones": [0.8, 0.9], "gamma": 0.4, "patience": 300, "keep": "last"},
        "data": {"image_size": 256, "crop_ratio": 1.0, "batch_size": 32, "val_fraction": 0.2},
    },
}

BUILTIN_MODELS = frozenset(MODEL_CONFIGS)


def register_model_config(name: str, defaults: dict) -> None:
    """Declares a plugin model's defaults, so that ``model.name=<name>`` resolves like a built-in one.

    ``defaults`` is a ``MODEL_CONFIGS`` entry: ``{"model": {constructor keyword arguments}, "train":
    {"trainer": <family>, ...}, "data": {...}}``; its ``model`` keys are the keys a user may override.
    Registering the name again (a re-run notebook cell) replaces the entry; a built-in name is refused.
    """
    if name in BUILTIN_MODELS:
        raise FrameworkError(f"Model '{name}' is built in: register the plugin model under another name")
    family = defaults.get("train", {}).get("trainer")
    if family not in TRAIN_CONFIGS:
        raise FrameworkError(f"Plugin model '{name}' must name its family in train.trainer: one of "
                             f"{', '.join(sorted(TRAIN_CONFIGS))}, got {family!r}")
    MODEL_CONFIGS[name] = copy.deepcopy(defaults)


# Model seeds that follow the run's seed unless set, so that --seeds 0,1,2 varies every random choice.
DERIVED_SEEDS = ("feature_seed", "coreset_seed")


def _pick(table: dict[str, dict], name: str, what: str, key: str) -> dict:
    if name not in table:
        raise FrameworkError(f"Unknown {what} '{name}' ({key}): known are {', '.join(sorted(table))}")
    return table[name]


def default_config(model: str, dataset: str, trainer: str | None = None) -> dict:
    """The merged defaults for one model on one dataset, before overrides."""
    model_entry = _pick(MODEL_CONFIGS, model, "model", "model.name")
    family = trainer or model_entry["train"]["trainer"]
    config = deep_merge(BASE_CONFIGS, _pick(DATA_CONFIGS, dataset, "dataset", "data.name"))
    config = deep_merge(config, _pick(TRAIN_CONFIGS, family, "trainer", "train.trainer"))
    config = deep_merge(config, model_entry)
    config["model"]["name"], config["data"]["name"], config["train"]["trainer"] = model, dataset, family
    return config


def _apply(config: dict, overrides: dict, prefix: str = "") -> None:
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in config:
            known = ", ".join(f"{prefix}{k}" for k in sorted(config))
            raise FrameworkError(f"Unknown config key '{path}': known keys here are {known}")
        if isinstance(config[key], dict):
            if not isinstance(value, dict):
                raise FrameworkError(f"Config key '{path}' is a section; give a dict or dotted keys like '{path}.x'")
            _apply(config[key], value, prefix=f"{path}.")
        else:
            config[key] = check_value(path, config[key], value)


def resolve_config(overrides: dict | None = None) -> dict:
    """The complete run config: defaults for the chosen model and dataset, then the checked overrides
    (plain keys, then the keys scoped to this model, see ``split_scoped``)."""
    plain, scoped = split_scoped(overrides or {})
    overrides = expand_dotted(plain)
    if "plugins" in overrides:  # before the defaults: a plugin brings its model's own
        overrides["plugins"] = load_plugins(overrides["plugins"])
    for section in ("model", "data", "train", "eval"):
        if not isinstance(overrides.get(section, {}), dict):
            raise FrameworkError(f"Config key '{section}' is a section; give a dict or dotted keys like '{section}.x'")
    model = overrides.get("model", {}).get("name", BASE_CONFIGS["model"]["name"])
    for scope in scoped:
        _pick(MODEL_CONFIGS, scope, "model", f"{scope}{SCOPE_SEPARATOR}...")
    overrides = deep_merge(overrides, expand_dotted(scoped.get(model, {})))
    dataset = overrides.get("data", {}).get("name", BASE_CONFIGS["data"]["name"])
    trainer = overrides.get("train", {}).get("trainer")
    config = default_config(model, dataset, trainer)
    refuse_epoch_keys_of_one_pass_models(config, overrides.get("train", {}))
    _apply(config, overrides)
    check_consistency(config)
    config["data"]["mask_size"] = config["data"]["mask_size"] or ("native" if config["data"]["tile_size"] else None)
    if "tile_ensemble" in config["model"] and config["model"]["tile_ensemble"] is None:
        data = config["data"]
        config["model"]["tile_ensemble"] = data["tile_size"] is not None and data["image_size"] != NATIVE
    for key in DERIVED_SEEDS:
        if key in config["model"] and config["model"][key] is None:
            config["model"][key] = config["seed"]
    return config
