"""The design's API: validation in training mode that leaves no trace, and a notebook driving every family
by hand (registries, fit, evaluate, predict, show_results) to the metrics of ``run_experiment``."""
import csv
from pathlib import Path

import pytest
import torch

from anomaly_framework.config import resolve_config
from anomaly_framework.main import run_experiment
from anomaly_framework.models import model_vae
from anomaly_framework.models.model_vae import reparameterize
from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.registry import MODELER_REGISTRY
from anomaly_framework.errors import FrameworkError
from anomaly_framework.utils import resolve_device, seed_everything, show_results


def _vae(name):
    """``vae`` samples its latent and has no batch norm; ``unet_vae`` has batch norm in every block too."""
    config = resolve_config({"model.name": name, "model.base_channels": 4, "data.image_size": 32, "device": "cpu",
                             **({"model.depth": 2} if name == "unet_vae" else {"model.latent_dim": 8})})
    return build_modeler(config, build_model(config))


def _batch_norm_state(model):
    return {name: value.clone() for name, value in model.state_dict().items() if "running" in name or "tracked" in name}


def test_validation_is_the_training_computation_without_back_propagation(monkeypatch):
    torch.manual_seed(0)
    modeler = _vae("vae")
    batch = {"image": torch.rand(4, 3, 32, 32)}
    sampled = []
    monkeypatch.setattr(model_vae, "reparameterize",
                        lambda mu, log_var, training: sampled.append(training) or reparameterize(mu, log_var, training))
    rng = torch.get_rng_state()
    report = modeler.validate_step(batch)
    assert sampled == [True]  # the latent was sampled, as in training
    assert torch.equal(torch.get_rng_state(), rng)  # and its draws given back
    # The same step with back-propagation (a zero learning rate) sees the same loss: same mode, same draws.
    trained = modeler.training_step(batch, torch.optim.SGD(modeler.model.parameters(), lr=0.0))
    assert set(trained) == {"loss", "train_metrics"} and set(report) == {"val_loss", "val_metrics"}
    assert report["val_loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert report["val_metrics"]["kl"] == pytest.approx(trained["train_metrics"]["kl"], rel=1e-6)


def test_validation_leaves_batch_norm_statistics_alone_and_normalises_with_them():
    torch.manual_seed(0)
    modeler = _vae("unet_vae")
    batch = {"image": torch.rand(4, 3, 32, 32) * 3}  # far from the initial statistics (mean 0, variance 1)
    before = _batch_norm_state(modeler.model)
    report = modeler.validate_step(batch)
    after = _batch_norm_state(modeler.model)
    assert len(before) > 0 and all(torch.equal(before[name], after[name]) for name in before)
    # By hand: sampling as in training, every batch norm on its running statistics, the same draws.
    with torch.random.fork_rng(), torch.no_grad():
        modeler.model.train()
        for module in modeler.model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        by_hand = float(modeler.compute_loss(modeler.model(batch["image"]), batch)["loss"])
        modeler.model.train()
        with_batch_statistics = float(modeler.compute_loss(modeler.model(batch["image"]), batch)["loss"])
    assert report["val_loss"] == pytest.approx(by_hand, rel=1e-6)
    assert with_batch_statistics != pytest.approx(by_hand, rel=1e-3)  # so the check above can fail
    # ...and a training forward on these images does move the statistics validation kept.
    assert not all(torch.equal(before[name], value) for name, value in _batch_norm_state(modeler.model).items())


def test_a_given_loss_fn_replaces_the_modelers_own():
    torch.manual_seed(0)
    reference = _vae("vae")
    def mean_abs_mu(outputs, batch):
        return outputs["mu"].abs().mean()

    modeler = MODELER_REGISTRY.get("vae")(reference.model, loss_fn=mean_abs_mu, config=reference.config)
    batch = {"image": torch.rand(2, 3, 32, 32)}
    report = modeler.validate_step(batch["image"])  # bare images are accepted as a batch
    with torch.random.fork_rng(), torch.no_grad():
        modeler.model.train()
        expected = float(modeler.model(batch["image"])["mu"].abs().mean())
    assert report["val_loss"] == pytest.approx(expected, rel=1e-6) and report["val_metrics"] == {}


@pytest.mark.parametrize("name", sorted(MODELER_REGISTRY.names()))
def test_modelers_override_the_hooks_not_the_design_calls(name):
    """``compute_anomaly_maps(inputs)`` / ``compute_anomaly_scores(inputs)`` are the design's calls on a
    batch; a modeler turns outputs into maps in ``maps_from_outputs`` / ``scores_from_maps``."""
    modeler = MODELER_REGISTRY.get(name)
    assert modeler.compute_anomaly_maps is BaseModeler.compute_anomaly_maps
    assert modeler.compute_anomaly_scores is BaseModeler.compute_anomaly_scores
    assert modeler.maps_from_outputs is not BaseModeler.maps_from_outputs


# -- the notebook -------------------------------------------------------------------------------------
SMALL = {"model.backbone": "resnet18", "model.pretrained": False}
FAMILIES = {
    "memory": {"model.name": "padim", **SMALL},
    "gradient": {"model.name": "stfpm", "train.lr": 0.05, "train.epochs": 1, **SMALL},
    "flow": {"model.name": "fastflow", "model.flow_steps": 2, "train.epochs": 1, **SMALL},
    "flow (cflow)": {"model.name": "cflow", "model.coupling_blocks": 2, "model.layers": [1, 2, 3],
                     "model.fiber_batch": 16, "train.epochs": 1, **SMALL},
    "classification": {"model.name": "draem", "model.reconstructive_width": 4, "model.discriminative_width": 4,
                       "model.score_filter": 3, "train.epochs": 1},
}


def _scores_csv(run_dir):
    with open(Path(run_dir) / "scores.csv") as handle:
        return torch.tensor([float(row["score"]) for row in csv.DictReader(handle)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_notebook_driving_each_family_by_hand_gets_run_experiments_metrics(family, tmp_path, demo_root, capsys):
    overrides = {**FAMILIES[family], "data.name": "demo", "data.root": str(demo_root), "data.image_size": 32,
                 "data.batch_size": 8, "data.val_fraction": 0.25, "eval.num_figures": 0,
                 "output_dir": str(tmp_path / "runs")}
    reference = run_experiment(overrides)

    # The notebook, step by step.
    config = resolve_config(overrides)
    seed_everything(config["seed"])
    dataloader = build_dataloader(config)
    model = build_model(config)
    modeler = build_modeler(config, model)
    trainer = build_trainer(config, modeler, dataloader, tmp_path, resolve_device(config["device"]))
    history = trainer.fit(dataloader.train_loader(), num_epochs=config["train"].get("epochs", 1),
                          valid_loader=dataloader.valid_loader())
    evaluation = trainer.evaluate(dataloader.test_loader())
    scores, labels = trainer.predict(dataloader.test_loader())
    shown = show_results(scores, labels, trainer.threshold)

    assert capsys.readouterr().out.count("image_auroc") == 2  # run_experiment's table, then the notebook's
    assert history["epochs"] == reference["fit"]["epochs"]
    assert len(history["history"]) == len(reference["fit"]["history"])
    for mine, theirs in zip(history["history"], reference["fit"]["history"]):
        assert mine["train"] == pytest.approx(theirs["train"], rel=1e-5)  # approx takes one flat dict
    assert {"anomaly_maps", "anomaly_scores", "labels", "metrics"} <= set(dict(evaluation))
    metrics, predictions = evaluation  # the earlier return, still unpacking
    assert metrics is evaluation["metrics"] and predictions.maps is evaluation["anomaly_maps"]
    assert evaluation["anomaly_maps"].shape == (len(labels), 1, 32, 32)
    assert torch.allclose(evaluation["anomaly_scores"], _scores_csv(reference["run_dir"]), rtol=1e-5, atol=1e-7)
    assert torch.equal(scores, evaluation["anomaly_scores"]) and torch.equal(labels, evaluation["labels"])
    for key, value in reference["metrics"].items():
        expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        assert evaluation["metrics"][key] == expected, key
    for key in ("image_auroc", "image_aupr", "image_f1_max", "f1", "accuracy"):
        assert shown["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5), key
    if family == "gradient":  # an epoch by hand, in both of the design's modes
        assert set(trainer.run_epoch(dataloader.valid_loader(), 1, 1, "valid")) >= {"loss"}
        with pytest.raises(FrameworkError, match="'train' or 'valid'"):
            trainer.run_epoch(dataloader.valid_loader(), 1, 1, "test")
