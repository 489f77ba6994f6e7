"""End-to-end parity: each model's public scoring path (modeler.evaluate_step / compute_anomaly_maps /
compute_anomaly_scores; inference.predict from a saved run; run_experiment on a folder of PNG files)
against the official code's whole inference path on the same fixed images and seeded weights
(tests/parity_inputs.py; fixtures tests/fixtures/parity/e2e_*.npz, made by
tools/parity/make_end_to_end_fixtures.py), and our preprocessing against each official dataset transform.
Maps and image scores, relative 1e-5 where both sides compute alike, 1e-4 where one side computes in
float64 (numpy / scipy) or sums in another order (stated per test). docs/parity.md lists the deviations."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_framework.config import resolve_config
from anomaly_framework.factories import build_model, build_modeler
from parity_inputs import parity_images, seeded_state, seeded_tensors, to_tensor

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


def fixture(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``e2e_<name>.npz``; its ``source`` must name repository, commit and functions."""
    with np.load(FIXTURES / f"e2e_{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    source = json.loads(str(arrays["source"]))
    assert source["repository"] and source["commit"] and source["functions"]
    return arrays


def modeler_for(name: str, size: int, **model: object):
    """Our modeler of ``name`` as run_experiment builds it (config defaults, then these overrides)."""
    overrides = {"model.name": name, "data.image_size": size, "device": "cpu",
                 **{f"model.{key}": value for key, value in model.items()}}
    config = resolve_config(overrides)
    return build_modeler(config, build_model(config))


def load_backbone(extractor: torch.nn.Module, seed: int = 0) -> None:
    """The seeded weights into a (truncated, timm) backbone: the same values per tensor name as the
    torchvision model the official code ran."""
    extractor.model.load_state_dict(seeded_state(extractor.model, seed))


def check_outputs(outputs: dict, maps: np.ndarray, scores: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), maps, rtol=rtol, atol=0)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), scores, rtol=rtol, atol=0)


def fit_one_pass(modeler, images: torch.Tensor) -> None:
    """A memory model's fit as the memory trainer does it: begin_fit, one training_step, fit; the model
    first put in training mode, as a trainer may (its frozen backbone must stay in eval mode)."""
    modeler.model.train()
    modeler.begin_fit(len(images))
    modeler.training_step(images)
    modeler.fit()


# -- the user's inference path: PNG files -> `predict` with a saved run --------------------------------
def predict_scores(modeler, images: np.ndarray, tmp_path: Path, **data: object) -> np.ndarray:
    """Saves the modeler as a run's checkpoint (the format run_experiment writes: model state, config,
    threshold), writes the images as PNG files and scores them with ``inference.predict`` (decode,
    resize / crop per the run's data config, normalisation, evaluate_step); scores in image order."""
    from PIL import Image

    from anomaly_framework.inference.predict import predict

    config = copy.deepcopy(modeler.config)
    config["data"].update(data)
    (tmp_path / "run").mkdir()
    torch.save({"model": modeler.state_dict(), "config": config, "threshold": 0.0}, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "images").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "images" / f"{index:03d}.png")
    result = predict(tmp_path / "run", tmp_path / "images", output_dir=tmp_path / "out", overlays=False)
    scores = {Path(row["image_path"]).stem: row["score"] for row in result["rows"]}
    return np.array([scores[f"{index:03d}"] for index in range(len(images))])


# -- PaDiM ----------------------------------------------------------------------------------------------
def test_padim_end_to_end_equals_official_main(tmp_path):
    """rtol 1e-4 (measured 6e-6): the official Mahalanobis, upsampling and smoothing run in float64, ours
    in float32 with its own summation order.
    The channel subset is the official random.sample draw (ours draws its own by default)."""
    official = fixture("padim")
    modeler = modeler_for("padim", 32, backbone="resnet18", pretrained=False, n_features=100)
    load_backbone(modeler.model.extractor)
    modeler.model.feature_index = torch.from_numpy(official["feature_index"])
    fit_one_pass(modeler, to_tensor(parity_images(96, 32, seed=1)))
    test = to_tensor(parity_images(4, 32, seed=2))
    outputs = modeler.evaluate_step(test)
    check_outputs(outputs, official["maps"], official["scores"], rtol=1e-4)
    torch.testing.assert_close(modeler.compute_anomaly_maps(test), outputs["anomaly_maps"], rtol=0, atol=0)
    torch.testing.assert_close(modeler.compute_anomaly_scores(test), outputs["anomaly_scores"], rtol=0, atol=0)
    scores = outputs["anomaly_maps"]
    normalised = ((scores - scores.min()) / (scores.max() - scores.min())).amax(dim=(1, 2, 3))
    np.testing.assert_allclose(normalised.numpy(), official["normalised_scores"], rtol=1e-4)
    # From PNG files through a saved run (no crop: the fixture's images are the model input).
    scores = predict_scores(modeler, parity_images(4, 32, seed=2), tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-4)


# -- Reverse Distillation and DFM (tools/parity/make_fixtures_rd_dfm.py) ---------------------------------
def test_reverse_distillation_end_to_end_equals_official_evaluation(tmp_path):
    """hq-deng/RD4AD's test.evaluation scoring (resnet18 pair, seeded weights by official name)."""
    from test_parity_reverse_distillation import load_official_weights

    official = fixture("reverse_distillation")
    modeler = modeler_for("reverse_distillation", 32, backbone="resnet18", pretrained=False)
    load_official_weights(modeler.model)
    modeler.model.train()  # evaluate_step must put it in eval mode
    with torch.no_grad():
        outputs = modeler.evaluate_step(to_tensor(parity_images(4, 32, seed=2)).contiguous())
    check_outputs(outputs, official["maps"], official["scores"], rtol=1e-5)
    scores = predict_scores(modeler, parity_images(4, 32, seed=2), tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-5)


def test_dfm_end_to_end_equals_anomalib(tmp_path):
    """anomalib 2.7.0's DFMModel fitted and scoring (resnet18 layer2, seeded weights); rtol 1e-4: the FRE is a
    difference of a vector and its projection, summed in float32 in another order."""
    official = fixture("dfm")
    modeler = modeler_for("dfm", 64, backbone="resnet18", pretrained=False, layers=[2])
    load_backbone(modeler.model.extractor)
    fit_one_pass(modeler, to_tensor(parity_images(24, 64, seed=1)))
    outputs = modeler.evaluate_step(to_tensor(parity_images(4, 64, seed=2)))
    check_outputs(outputs, official["maps"], official["scores"], rtol=1e-4)
    scores = predict_scores(modeler, parity_images(4, 64, seed=2), tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-4)


# -- PatchCore ------------------------------------------------------------------------------------------
def test_patchcore_end_to_end_equals_official_predict(tmp_path):
    """The official run (backbone handed over in training mode: ``official_batchnorm_pass``), whole
    bank, one neighbour, image score = max patch score. Documented deviation: faiss returns squared
    distances, so the official scores are ours squared and the official maps are the smoothed squared
    distances; ours smooth the Euclidean ones, which the official RescaleSegmentor gives on the square
    roots of its patch scores (``euclidean_maps``). rtol 1e-4 (measured 7e-6): float32 distances summed
    in another order."""
    official = fixture("patchcore")
    modeler = modeler_for("patchcore", 64, backbone="resnet18", pretrained=False, coreset_ratio=1.0,
                          score_mode="max", num_neighbors=1, official_batchnorm_pass=True)
    load_backbone(modeler.model.extractor)
    fit_one_pass(modeler, to_tensor(parity_images(8, 64, seed=3)))
    test = to_tensor(parity_images(4, 64, seed=4))
    outputs = modeler.evaluate_step(test)
    np.testing.assert_allclose(outputs["anomaly_scores"].square().numpy(), official["scores"], rtol=1e-4)
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), official["euclidean_maps"], rtol=1e-4)
    np.testing.assert_allclose(modeler.compute_anomaly_scores(test).square().numpy(), official["scores"], rtol=1e-4)
    # The deviation's size: the official (squared) maps are not our maps squared once smoothed.
    assert not np.allclose(outputs["anomaly_maps"][:, 0].square().numpy(), official["maps"], rtol=1e-3)
    scores = predict_scores(modeler, parity_images(4, 64, seed=4), tmp_path, crop_ratio=1.0)
    np.testing.assert_allclose(np.square(scores), official["scores"], rtol=1e-4)


# -- STFPM ----------------------------------------------------------------------------------------------
def stfpm_modeler(official: dict):
    """Our STFPM with the official run's seeded teacher (seed 0) and student (seed 1)."""
    modeler = modeler_for("stfpm", 256, backbone="resnet18", pretrained=False)
    load_backbone(modeler.model.teacher, seed=0)
    load_backbone(modeler.model.student, seed=1)
    return modeler


def test_stfpm_end_to_end_equals_official_test(tmp_path):
    """Teacher and student with the official run's seeded weights (the student standing in for a trained
    one), 256-pixel inputs (the official test hard-codes the 64×64 product grid). rtol 1e-5 (measured
    9e-7: cv2's float resize and torch's bilinear interpolation round differently); maps compared on a
    subsampled grid."""
    official = fixture("stfpm")
    modeler = stfpm_modeler(official)
    with torch.no_grad():  # as the trainers evaluate
        outputs = modeler.evaluate_step(to_tensor(parity_images(2, 256, seed=5)))
    grid = official["grid"]
    maps = outputs["anomaly_maps"][:, 0][:, grid][:, :, grid]
    np.testing.assert_allclose(maps.numpy(), official["maps_on_grid"], rtol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), official["scores"], rtol=1e-5)
    np.testing.assert_allclose(predict_scores(modeler, parity_images(2, 256, seed=5), tmp_path), official["scores"], rtol=1e-5)


# -- FastFlow -------------------------------------------------------------------------------------------
def fastflow_modeler(official: dict):
    """Our FastFlow with the official run's seeded backbone, LayerNorms, flows and recorded permutations."""
    modeler = modeler_for("fastflow", 64, backbone="resnet18", pretrained=False)
    model = modeler.model
    load_backbone(model.extractor)
    state = model.state_dict()
    named = {k: v for k, v in state.items() if k.startswith(("norms", "flows")) and "permutation" not in k}
    values = seeded_tensors(named)
    for stage, flow in enumerate(model.flows):
        for step, _ in enumerate(flow.blocks):
            permutation = torch.from_numpy(official[f"permutation_{stage}_{step}"])
            values[f"flows.{stage}.blocks.{step}.permutation"] = permutation
            values[f"flows.{stage}.blocks.{step}.inverse_permutation"] = permutation.argsort()
    model.load_state_dict({**state, **values})
    return modeler


def test_fastflow_end_to_end_equals_official_forward(tmp_path):
    """The official resnet18 setting (8 steps, 3×3 only, hidden ratio 1) at 64 px with the official run's
    seeded backbone, LayerNorms and flows and its recorded channel permutations. rtol 1e-5 (abs 1e-7
    where the map is −exp of a large energy, i.e. near 0)."""
    official = fixture("fastflow")
    modeler = fastflow_modeler(official)
    with torch.no_grad():
        outputs = modeler.evaluate_step(to_tensor(parity_images(4, 64, seed=6)))
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), official["maps"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), official["scores"], rtol=1e-5, atol=1e-7)
    scores = predict_scores(modeler, parity_images(4, 64, seed=6), tmp_path)
    np.testing.assert_allclose(scores, official["scores"], rtol=1e-5, atol=1e-7)


# -- DRAEM ----------------------------------------------------------------------------------------------
def draem_modeler(official: dict):
    """Our DRAEM at width 8 with the seeded values the official networks carried."""
    modeler = modeler_for("draem", 256, reconstructive_width=8, discriminative_width=8)
    modeler.model.load_state_dict(seeded_state(modeler.model))
    return modeler


def test_draem_end_to_end_equals_official_test(tmp_path):
    """Both networks at width 8 (the official path is width-independent; 128 / 64 would only be slower)
    with the seeded values, 256-pixel [0, 1] images as the official test feeds them. Map = softmax
    anomaly channel, score = max of its 21×21 average (zero padding counted). rtol 1e-5; maps compared
    on a subsampled grid."""
    official = fixture("draem")
    modeler = draem_modeler(official)
    images = to_tensor(parity_images(4, 256, seed=7), normalize=False)
    with torch.no_grad():
        outputs = modeler.evaluate_step(images)
    grid = official["grid"]
    maps = outputs["anomaly_maps"][:, 0][:, grid][:, :, grid]
    np.testing.assert_allclose(maps.numpy(), official["maps_on_grid"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), official["scores"], rtol=1e-5)
    np.testing.assert_allclose(predict_scores(modeler, parity_images(4, 256, seed=7), tmp_path), official["scores"], rtol=1e-5)


# -- AE / VAE (no official code: an independent float64 reference from the formulas) -------------------
def reference_l2_maps(images: torch.Tensor, reconstruction: torch.Tensor, sigma: float = 4.0) -> np.ndarray:
    """Bergmann et al.'s per-pixel L2 residual (squared error summed over channels), smoothed with
    scipy.ndimage.gaussian_filter (σ 4, its default reflect border and 4σ truncation), in float64."""
    from scipy.ndimage import gaussian_filter

    error = (images.double() - reconstruction.double()).square().sum(dim=1).numpy()
    return np.stack([gaussian_filter(e, sigma=sigma) for e in error])


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_autoencoder_end_to_end_equals_float64_reference(name, tmp_path):
    """Our float32 public path against a float64 reference: the network in float64 and eval mode (the
    VAE decoding its posterior mean μ, not a sample), the L2 residual map smoothed by scipy, score = the
    map's maximum. rtol 1e-5 (float32 against float64 on a 32-pixel map)."""
    modeler = modeler_for(name, 32, base_channels=4, latent_dim=8)
    modeler.model.load_state_dict(seeded_state(modeler.model, seed=3))
    images = to_tensor(parity_images(4, 32, seed=8), normalize=False)
    with torch.no_grad():
        outputs = modeler.evaluate_step(images)
        reference = copy.deepcopy(modeler.model).double().eval()
        if name == "vae":
            mu = reference.encoder(images.double()).chunk(2, dim=1)[0]
            reconstruction = reference.decoder(mu)
        else:
            reconstruction = reference(images.double())["reconstruction"]
    maps = reference_l2_maps(images, reconstruction)
    np.testing.assert_allclose(outputs["anomaly_maps"][:, 0].numpy(), maps, rtol=1e-5, atol=0)
    np.testing.assert_allclose(outputs["anomaly_scores"].numpy(), maps.reshape(4, -1).max(1), rtol=1e-5)
    np.testing.assert_allclose(modeler.compute_anomaly_scores(images).detach().numpy(), maps.reshape(4, -1).max(1), rtol=1e-5)
    scores = predict_scores(modeler, parity_images(4, 32, seed=8), tmp_path)
    np.testing.assert_allclose(scores, maps.reshape(4, -1).max(1), rtol=1e-5)


# -- run_experiment on a folder of the same images ------------------------------------------------------
def write_folder(root: Path, train: np.ndarray, test: np.ndarray) -> dict[str, str]:
    """The images as PNG files (lossless) in the folder dataset's layout; odd test images are the anomalous."""
    from PIL import Image

    for index, image in enumerate(train):
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "train" / f"{index:03d}.png")
    for index, image in enumerate(test):
        folder = root / "test" / ("bad" if index % 2 else "ok")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return {"data.name": "folder", "data.root": str(root), "data.train_dir": "train",
            "data.test_normal_dir": "test/ok", "data.test_abnormal_dir": "test/bad"}


def run_scores(results: dict, tmp_path: Path) -> np.ndarray:
    """The run's per-image scores (scores.csv), in the fixture's image order (file stem = index)."""
    import csv

    run_dir = next((tmp_path / "runs").rglob("scores.csv")).parent
    with (run_dir / "scores.csv").open() as handle:
        rows = {Path(row["image_path"]).stem: float(row["score"]) for row in csv.DictReader(handle)}
    return np.array([rows[f"{index:03d}"] for index in range(len(rows))])


def test_patchcore_run_experiment_on_a_folder_equals_official_predict(tmp_path):
    """run_experiment from PNG files (64 px, no resize or crop, ImageNet normalisation) with the seeded
    weights as a weights file: its scores.csv equals the official scores (squared, see above)."""
    import timm

    from anomaly_framework.main import run_experiment

    official = fixture("patchcore")
    weights = tmp_path / "resnet18_seeded.pth"
    torch.save(seeded_state(timm.create_model("resnet18")), weights)
    data = write_folder(tmp_path / "data", parity_images(8, 64, seed=3), parity_images(4, 64, seed=4))
    results = run_experiment({**data, "data.image_size": 64, "data.crop_ratio": 1.0, "data.num_workers": 0,
                              "model.name": "patchcore", "model.backbone": "resnet18", "model.weights": str(weights),
                              "model.coreset_ratio": 1.0, "model.score_mode": "max", "model.num_neighbors": 1,
                              "model.official_batchnorm_pass": True, "eval.num_figures": 0, "device": "cpu",
                              "output_dir": str(tmp_path / "runs")})
    np.testing.assert_allclose(np.square(run_scores(results, tmp_path)), official["scores"], rtol=1e-4)


# -- preprocessing: a user's PNG file through our dataset against each official dataset's transform ------
def our_preprocessing(name: str, tmp_path: Path) -> torch.Tensor:
    """The fixed PNG files through the folder dataset with ``name``'s default data config [N, 3, H, W]."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
    from preprocessing_fixtures import write_pngs

    from anomaly_framework.dataloaders.dataloader_folder import FolderDataloader

    write_pngs(tmp_path / "train")
    write_pngs(tmp_path / "test" / "ok")
    write_pngs(tmp_path / "test" / "bad")
    config = resolve_config({"model.name": name, "data.name": "folder", "data.root": str(tmp_path),
                             "data.train_dir": "train", "data.test_normal_dir": "test/ok",
                             "data.test_abnormal_dir": "test/bad", "data.cache": False})
    dataset = FolderDataloader(config["data"], seed=0).test_dataset
    normal = [i for i, sample in enumerate(dataset.samples) if "ok" in Path(sample.path).parts]
    return torch.stack([dataset[i]["image"] for i in normal]).double()


def check_preprocessing(ours: torch.Tensor, official: dict, name: str, rtol: float, atol: float) -> None:
    assert tuple(ours.shape) == tuple(official[f"{name}_shape"])
    np.testing.assert_allclose(ours[:, :, ::3, ::3].float().numpy(), official[f"{name}_grid"], rtol=rtol, atol=atol)
    assert ours.sum().item() == pytest.approx(float(official[f"{name}_sum"]), rel=1e-6)
    assert ours.square().sum().item() == pytest.approx(float(official[f"{name}_sum_squares"]), rel=1e-6)


@pytest.mark.parametrize("name", ["padim", "patchcore", "stfpm", "fastflow"])
def test_preprocessing_equals_the_official_transforms(name, tmp_path):
    """Decode, resize (PaDiM Lanczos 256, PatchCore bilinear 256, STFPM / FastFlow bilinear 256), centre
    crop (224 for PaDiM and PatchCore), ToTensor and ImageNet normalisation: ours with each model's
    default data config equals the official dataset's output to float32 rounding."""
    check_preprocessing(our_preprocessing(name, tmp_path), fixture("preprocessing"), name, rtol=1e-6, atol=1e-6)


def test_draem_preprocessing_deviates_from_the_official_cv2_path_by_its_measured_size(tmp_path):
    """Documented deviation: the official DRAEM reads BGR with cv2.imread and resizes with cv2.resize
    (INTER_LINEAR, no antialiasing); ours decodes RGB with Pillow and resizes with Pillow's bilinear
    filter, as for every model. Both give [0, 1] images, 256 px, no normalisation. Measured on the
    fixture's 320 → 256 images, channels reordered: at most 24/255 apart per value (where the
    downsampling filters differ), 2.4/255 on average; in the official channel order they differ
    everywhere (mean 0.115)."""
    ours, official = our_preprocessing("draem", tmp_path), fixture("preprocessing")
    assert tuple(ours.shape) == tuple(official["draem_shape"])
    levels = ours.numpy() * 255  # no normalisation: every value is a decoded byte / 255
    np.testing.assert_allclose(levels, np.round(levels), rtol=0, atol=1e-3)
    difference = np.abs(ours[:, [2, 1, 0], ::3, ::3].numpy() - official["draem_grid"])
    assert difference.max() <= 24.5 / 255 and difference.mean() <= 2.5 / 255
    assert np.abs(ours[:, :, ::3, ::3].numpy() - official["draem_grid"]).mean() > 0.1


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_autoencoder_preprocessing_equals_torchvision_resize_and_to_tensor(name, tmp_path):
    """No official code: the reference is torchvision's Resize(256) + ToTensor as the official FastFlow
    dataset applies them (its fixture tensor with the Normalize undone): [0, 1] RGB, bilinear 256."""
    official = fixture("preprocessing")
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    reference = official["fastflow_grid"].astype(np.float64) * std + mean
    ours = our_preprocessing(name, tmp_path)
    assert tuple(ours.shape) == tuple(official["fastflow_shape"])
    np.testing.assert_allclose(ours[:, :, ::3, ::3].numpy(), reference, rtol=0, atol=1e-6)


TRAINED_FAMILIES = {  # model: (setup, image size, fixture images (count, seed), rtol)
    "stfpm": (stfpm_modeler, 256, (2, 5), 1e-5),
    "fastflow": (fastflow_modeler, 64, (4, 6), 1e-5),
    "draem": (draem_modeler, 256, (4, 7), 1e-5),
}


@pytest.mark.parametrize("name", sorted(TRAINED_FAMILIES))
def test_trained_families_run_experiment_on_a_folder_equals_official(name, tmp_path):
    """The gradient (STFPM), flow (FastFlow) and classification (DRAEM) families through run_experiment:
    training would change the fixture's weights, so a first run of one epoch keeps its training state
    (``train.keep_training_state``), its saved weights are replaced by the seeded ones, and a second
    run resumes it (``train.resume``) with nothing left to train, then evaluates the folder's test
    images as any run does (data loading from PNG files, checkpoint reload, evaluate_step, scores.csv)."""
    from anomaly_framework.main import run_experiment

    setup, size, (count, seed), rtol = TRAINED_FAMILIES[name]
    official = fixture(name)
    seeded = setup(official)
    images = parity_images(count, size, seed=seed)
    data = write_folder(tmp_path / "data", images, images)
    config = {**data, **{f"model.{k}": v for k, v in seeded.config["model"].items() if k != "name"},
              "model.name": name, "data.image_size": size, "data.num_workers": 0,
              "train.epochs": 1, "train.keep_training_state": True, "eval.num_figures": 0, "device": "cpu",
              "output_dir": str(tmp_path / "first")}
    run_experiment(config)
    first = next((tmp_path / "first").rglob("last.pt")).parent
    for name_ in ("last.pt", "checkpoint.pt"):
        state = torch.load(first / name_, weights_only=False)
        torch.save({**state, "model": seeded.state_dict()}, first / name_)
    run_experiment({**config, "train.resume": str(first), "output_dir": str(tmp_path / "runs")})
    np.testing.assert_allclose(run_scores({}, tmp_path), official["scores"], rtol=rtol, atol=1e-7)
