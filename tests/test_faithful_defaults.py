"""The official setups as defaults: backbone weight tags, STFPM's student and map, the kept epoch,
PatchCore's optional batch-norm side effect, DTD's folder layout, and ground truth at any resolution."""
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import anomaly_framework.backbones.weights as weights
from anomaly_framework.config import MODEL_CONFIGS, resolve_config
from anomaly_framework.dataloaders.anomaly_simulation import TextureSource
from anomaly_framework.dataloaders.dataloader_mvtec import MVTecDataloader
from anomaly_framework.main import run_experiment
from anomaly_framework.backbones.extractors import TimmFeatureExtractor
from anomaly_framework.backbones.weights import hub_tag
from anomaly_framework.models.model_patchcore import PatchcoreModel
from anomaly_framework.models.model_stfpm import STFPMModel
from anomaly_framework.trainers.trainer_base import BaseTrainer
from anomaly_framework.errors import FrameworkError

# The weights each official code loads: torchvision's ImageNet V1 (PaDiM, PatchCore, STFPM; FastFlow's
# resnet18 through its pinned timm, whose resnet18 was torchvision's).
OFFICIAL_TAGS = {"padim": "wide_resnet50_2.tv_in1k", "patchcore": "wide_resnet50_2.tv_in1k",
                 "stfpm": "resnet18.tv_in1k", "fastflow": "resnet18.tv_in1k", "cflow": "wide_resnet50_2.tv_in1k",
                 "reverse_distillation": "wide_resnet50_2.tv_in1k",  # RD4AD: torchvision's wide_resnet50_2 V1 file
                 "dfm": "resnet50.a1_in1k",  # anomalib: timm.create_model("resnet50", pretrained=True)
                 # SimpleNet: torchvision wide_resnet50_2(pretrained=True); SuperSimpleNet: weights="IMAGENET1K_V1".
                 "simplenet": "wide_resnet50_2.tv_in1k", "supersimplenet": "wide_resnet50_2.tv_in1k"}


def test_every_default_backbone_resolves_to_the_official_weights():
    with_backbone = sorted(name for name, entry in MODEL_CONFIGS.items() if "backbone" in entry["model"])
    assert with_backbone == sorted(OFFICIAL_TAGS)
    for name, tag in OFFICIAL_TAGS.items():
        assert hub_tag(resolve_config({"model.name": name})["model"]["backbone"]) == tag
    assert hub_tag("resnet18") == "resnet18.a1_in1k"  # what the untagged name would have fetched


# FastFlow's other official backbones, as its pinned timm 0.5.4 served them (the file each default_cfg named);
# docs/usage.md gives these tags for the WR50 and transformer settings.
FASTFLOW_OFFICIAL_FILES = {"wide_resnet50_2.racm_in1k": "wide_resnet50_racm-8234f177.pth",
                           "deit_base_distilled_patch16_384.fb_in1k": "deit_base_distilled_patch16_384-d0272ac0.pth",
                           "cait_m48_448.fb_dist_in1k": "M48_448.pth"}


def test_fastflow_documented_tags_name_the_files_its_pinned_timm_loaded():
    for tag, file_name in FASTFLOW_OFFICIAL_FILES.items():
        assert timm.models.get_pretrained_cfg(tag).url.rsplit("/", 1)[-1] == file_name, tag


def test_hub_is_asked_for_the_tag_and_it_is_recorded(tmp_path, monkeypatch):
    """No download: the hub call is intercepted, the name it receives and the recorded source are checked."""
    requested = []
    create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            requested.append(name)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(weights, "hub_reachable", lambda: True)
    monkeypatch.setattr(timm, "create_model", offline_create)
    extractor = TimmFeatureExtractor(resolve_config({"model.name": "stfpm"})["model"]["backbone"], [1])
    assert requested == ["resnet18.tv_in1k"]
    assert extractor.weights_source == "hub:resnet18.tv_in1k" and extractor.weights_sha256 is None


def test_tagged_local_file_is_used_and_its_sha256_recorded(tmp_path, monkeypatch):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "resnet18.tv_in1k.pth"
    torch.save(state, path)
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(tmp_path))
    extractor = TimmFeatureExtractor("resnet18.tv_in1k", [1])
    assert extractor.weights_source == str(path)
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(extractor.model.conv1.weight, state["conv1.weight"])
    with pytest.raises(FrameworkError, match=r"Unknown pretrained tag in 'resnet18\.nope'.*resnet18\.tv_in1k"):
        TimmFeatureExtractor("resnet18.nope", [1], pretrained=False)


def test_results_and_checkpoint_name_the_weights_file(tmp_path, monkeypatch):
    path = tmp_path / "resnet18.tv_in1k.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("ANOMALY_FRAMEWORK_WEIGHTS", str(tmp_path))
    _thin_defect_dataset(tmp_path)
    results = run_experiment({"model.name": "padim", "model.backbone": "resnet18.tv_in1k", "data.name": "mvtec",
                              "data.root": str(tmp_path), "data.category": "lines", "data.image_size": 32,
                              "data.mask_size": 128, "eval.num_figures": 0, "output_dir": str(tmp_path / "runs")})
    assert results["weights_source"] == str(path) and results["weights_sha256"] == digest
    checkpoint = torch.load(Path(results["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert checkpoint["weights"] == {"weights_source": str(path), "weights_sha256": digest}


def test_efficientnet_features_stop_at_the_last_requested_stage():
    torch.manual_seed(0)
    full = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=[1, 2, 3]).eval()
    extractor = TimmFeatureExtractor("efficientnet_lite0", [1, 2, 3], pretrained=False)
    extractor.model.load_state_dict(full.state_dict(), strict=False)
    assert len(extractor.model.blocks) == 5 and len(full.blocks) == 7
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, reference in zip(extractor(images), full(images)):
            assert torch.equal(ours, reference)


def test_stfpm_student_starts_as_torchvision_resnet18_with_unit_batchnorm():
    model = STFPMModel("resnet18", pretrained=False)
    norms = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1 + 2 * 6 + 2  # stem, two per block of layer1-3, two downsample norms
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    # timm's own init zeroes each block's last norm: the student must not keep that.
    timm_bn2 = timm.create_model("resnet18", pretrained=False).layer1[0].bn2.weight
    assert not timm_bn2.any()


def test_stfpm_map_is_the_product_on_the_feature_grid_then_resized():
    torch.manual_seed(0)
    model = STFPMModel("resnet18", pretrained=False).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        outputs = model(images)
        ours = model.anomaly_map(outputs, (128, 128))
    grid = None
    for t, s in zip(outputs["teacher"], outputs["student"]):  # the official test(): 64×64 there, 32×32 here
        level = torch.sum((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2, 1, keepdim=True)
        level = F.interpolate(level, size=(32, 32), mode="bilinear", align_corners=False)
        grid = level if grid is None else grid * level
    official = np.stack([cv2.resize(m[0].numpy(), (128, 128)) for m in grid])  # the official cv2.resize
    assert np.allclose(ours[:, 0].numpy(), official, rtol=1e-5, atol=1e-7)


def test_keep_last_is_faithful_for_fastflow_and_draem_and_evaluates_the_final_epoch(tmp_path):
    for name in ("fastflow", "draem"):
        config = resolve_config({"model.name": name})
        # keep=last as the official code; 20 % of train/good held out for an out-of-sample threshold (issue 24),
        # which the official code, training on all of it, does not set.
        assert config["train"]["keep"] == "last" and config["data"]["val_fraction"] == 0.2
        assert config["train"]["patience"] == config["train"]["epochs"]
    _thin_defect_dataset(tmp_path)
    results = run_experiment({"model.name": "fastflow", "model.backbone": "resnet18", "model.pretrained": False,
                              "data.name": "mvtec", "data.root": str(tmp_path), "data.category": "lines",
                              "data.image_size": 32, "data.mask_size": 128, "data.batch_size": 2, "train.epochs": 2,
                              "train.keep_training_state": True, "eval.num_figures": 0,
                              "output_dir": str(tmp_path / "runs")})
    run_dir = Path(results["run_dir"])
    assert results["fit"]["kept"] == "epoch 2 (last)" and not (run_dir / "best.pt").exists()
    last = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    evaluated = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert last.keys() == evaluated.keys() and all(torch.equal(last[k], evaluated[k]) for k in last)


def test_patchcore_official_batchnorm_pass_moves_the_statistics_as_a_train_mode_ones_forward():
    torch.manual_seed(0)
    quirk = PatchcoreModel("resnet18", pretrained=False, official_batchnorm_pass=True, coreset_ratio=1.0)
    plain = PatchcoreModel("resnet18", pretrained=False, coreset_ratio=1.0)
    plain.load_state_dict(quirk.state_dict())
    before = {k: v.clone() for k, v in quirk.extractor.model.state_dict().items()}
    reference = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=[2, 3])
    reference.load_state_dict(before)
    reference.train()
    with torch.no_grad():
        reference(torch.ones(1, 3, 64, 64))
    images = torch.randn(2, 3, 64, 64)
    for model in (quirk, plain):
        model.begin_fit(2)
        with torch.inference_mode():
            model.update(images)
    after, expected = quirk.extractor.model.state_dict(), reference.state_dict()
    assert all(torch.equal(after[key], expected[key]) for key in expected)
    # Independently: the stem's running mean moved one momentum step (0.1) towards conv1(ones)'s mean.
    stem = quirk.extractor.model.conv1(torch.ones(1, 3, 64, 64)).mean(dim=(0, 2, 3))
    assert torch.allclose(after["bn1.running_mean"], 0.9 * before["bn1.running_mean"] + 0.1 * stem, atol=1e-6)
    assert not quirk.extractor.training
    untouched = plain.extractor.model.state_dict()
    assert all(torch.equal(untouched[key], before[key]) for key in before)


def test_official_batchnorm_pass_feeds_the_ones_through_the_weights_input_map():
    # The official code feeds its all-ones image where it feeds normalised images; the Lite0 package
    # weights see every image through an input map (their own statistics), so the ones go through it too.
    import copy
    model = PatchcoreModel("efficientnet_lite0", official_batchnorm_pass=True, coreset_ratio=1.0)
    extractor = model.extractor
    assert not torch.equal(extractor.input_scale, torch.ones_like(extractor.input_scale))
    reference = copy.deepcopy(extractor.model).train()
    with torch.no_grad():
        reference(torch.ones(1, 3, 64, 64) * extractor.input_scale + extractor.input_shift)
    model.prepare_extractor(64)
    after, expected = extractor.model.state_dict(), reference.state_dict()
    assert all(torch.equal(after[key], expected[key]) for key in expected)


def test_dtd_is_read_from_any_level_of_its_distributed_layout(tmp_path):
    images = tmp_path / "dtd" / "images"
    for texture_class in ("banded", "zigzagged"):
        (images / texture_class).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index, 0, 0)).save(images / texture_class / f"{texture_class}_{index}.jpg")
    (tmp_path / "dtd" / "labels").mkdir()
    (tmp_path / "dtd" / "labels" / "train1.txt").write_text("banded/banded_0.jpg\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "dtd" / "preview.png")  # not a texture: outside images/
    expected = sorted(images.glob("*/*.jpg"))
    for root in (tmp_path, tmp_path / "dtd", images):
        assert TextureSource(root, 16).paths == expected


def _thin_defect_dataset(root: Path) -> Path:
    """A category whose only defect is a one-pixel line on 128-px images."""
    rng = np.random.default_rng(0)
    category = root / "lines"
    for folder in ("train/good", "test/good", "test/line", "ground_truth/line"):
        (category / folder).mkdir(parents=True)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(category / f"train/good/{index:03d}.png")
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(category / "test/good/000.png")
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(category / "test/line/000.png")
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[20:110, 61] = 255
    Image.fromarray(mask).save(category / "ground_truth/line/000_mask.png")
    return category


class _MeanMapModeler:
    """Maps = the images' channel mean, scores = its maximum: known maps for the evaluation path."""

    def to(self, device):
        return self

    def evaluate_step(self, batch, held_out=None):
        maps = batch["image"].mean(dim=1, keepdim=True)
        return {"anomaly_maps": maps, "anomaly_scores": maps.amax(dim=(1, 2, 3))}


@pytest.mark.parametrize("mask_size, crop_ratio", [(128, 1.0), ("native", 1.0), ("native", 0.8), (64, 0.8)])
def test_ground_truth_comes_from_the_original_masks(tmp_path, mask_size, crop_ratio):
    category = _thin_defect_dataset(tmp_path)
    config = resolve_config({"model.name": "padim", "data.name": "mvtec", "data.root": str(tmp_path),
                             "data.category": "lines", "data.image_size": 32, "data.crop_ratio": crop_ratio,
                             "data.mask_size": mask_size})
    dataloader = MVTecDataloader(config["data"], seed=0)
    trainer = BaseTrainer(_MeanMapModeler(), dataloader, config, tmp_path, torch.device("cpu"))
    predictions = trainer.predict(dataloader.test_loader(), ground_truth=True)
    original = np.asarray(Image.open(category / "ground_truth/line/000_mask.png")) > 0
    if mask_size == "native":  # the crop region at 128 px: what the 32-px input covers
        resize = round(32 / crop_ratio)
        offset = (resize - 32) // 2
        left, right = round(offset * 128 / resize), round((offset + 32) * 128 / resize)
        expected = original[left:right, left:right]
    else:
        resize = round(mask_size / crop_ratio)
        resized = np.asarray(Image.fromarray(original.astype(np.uint8) * 255).resize((resize, resize), Image.NEAREST)) > 0
        offset = (resize - mask_size) // 2
        expected = resized[offset:offset + mask_size, offset:offset + mask_size]
    line = predictions.defect_types.index("line")
    assert np.array_equal(predictions.eval_masks[line], expected)
    assert expected.sum() > 0  # the thin line survives, where the 32-px input mask has lost or widened it
    heat = predictions.maps[line:line + 1]
    reference = F.interpolate(heat, size=expected.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(predictions.eval_maps[line], reference)
    assert predictions.eval_masks[predictions.defect_types.index("good")].shape == expected.shape


def test_native_resolution_is_recorded_and_bad_values_refused(tmp_path):
    _thin_defect_dataset(tmp_path)
    results = run_experiment({"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                              "data.name": "mvtec", "data.root": str(tmp_path), "data.category": "lines",
                              "data.image_size": 32, "data.crop_ratio": 1.0, "data.mask_size": "native",
                              "eval.num_figures": 0, "output_dir": str(tmp_path / "runs")})
    recorded = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert recorded["mask_size"] == "native" and recorded["pixel_resolution"].startswith("native")
    with pytest.raises(FrameworkError, match="data.mask_size"):
        resolve_config({"data.mask_size": "full"})
