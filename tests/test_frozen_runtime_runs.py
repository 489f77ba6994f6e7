"""Whole runs with an exported backbone and threaded decoding: the same batches, the same scores."""
import importlib.util

import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_framework.config import resolve_config
from anomaly_framework.dataloaders.prefetch import ThreadedLoader
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.errors import FrameworkError

ONNXRUNTIME = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime"))


def _config(demo_root, tmp_path, **overrides) -> dict:
    return resolve_config({"model.name": "padim", "model.backbone": "resnet18", "model.pretrained": False,
                           "model.layers": [1, 2], "data.root": str(demo_root), "data.image_size": 64,
                           "data.batch_size": 8, "output_dir": str(tmp_path),
                           "data.cache_dir": str(tmp_path / "cache"), **overrides})


def _evaluated(config, tmp_path):
    torch.manual_seed(0)
    modeler = build_modeler(config, build_model(config))
    trainer = build_trainer(config, modeler, build_dataloader(config), tmp_path, torch.device("cpu"))
    trainer.fit()
    _, predictions = trainer.evaluate()
    return trainer, predictions


def test_threaded_decoding_gives_the_plain_loaders_batches(demo_root, tmp_path):
    dataset = build_dataloader(_config(demo_root, tmp_path, **{"data.cache": False})).test_dataset
    plain = list(DataLoader(dataset, batch_size=5, shuffle=False, num_workers=0))
    threaded = list(ThreadedLoader(dataset, batch_size=5, threads=3))
    assert len(threaded) == len(plain) == -(-len(dataset) // 5)
    for want, got in zip(plain, threaded):
        assert want.keys() == got.keys()
        for key in want:
            if isinstance(want[key], torch.Tensor):
                assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key])
            else:
                assert want[key] == got[key]


@pytest.mark.skipif(not ONNXRUNTIME, reason="onnx and onnxruntime (the 'export' extra) not installed")
def test_padim_scores_with_onnxruntime_match_torch(demo_root, tmp_path):
    eager, reference = _evaluated(_config(demo_root, tmp_path / "torch"), tmp_path / "torch")
    config = _config(demo_root, tmp_path / "ort", **{"model.backbone_runtime": "onnxruntime"})
    exported, predictions = _evaluated(config, tmp_path / "ort")
    assert list((tmp_path / "ort" / "cache" / "backbones").glob("*.onnx"))  # the export ran and was stored
    scale = reference.scores.abs().max()
    assert (predictions.scores - reference.scores).abs().max() <= 1e-5 * scale
    assert (predictions.maps - reference.maps).abs().max() <= 1e-5 * reference.maps.abs().max()
    assert abs(exported.threshold - eager.threshold) <= 1e-5 * abs(eager.threshold)


def test_bad_runtime_in_the_config_is_refused_before_building(demo_root, tmp_path):
    config = _config(demo_root, tmp_path, **{"model.backbone_runtime": "tensorrt"})
    with pytest.raises(FrameworkError, match="Unknown model.backbone_runtime 'tensorrt'"):
        build_model(config)
