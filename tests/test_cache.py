"""The decoded-image cache and the frozen-feature reuse: same results, each image decoded and run once."""
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_framework.config import resolve_config
from anomaly_framework.dataloaders.dataloader_base import AnomalyDataset, Sample
from anomaly_framework.dataloaders.image_cache import ArrayStore, cache_root, default_cache_root
from anomaly_framework.factories import build_dataloader, build_model, build_modeler, build_trainer
from anomaly_framework.trainers.feature_cache import FeatureCacheMixin, evict, extractor_key
from anomaly_framework.backbones.extractors import TimmFeatureExtractor


def _fitted(demo_root, tmp_path, name, **overrides):
    """A fitted, evaluated trainer on the shared demo data (64 px, random-init ResNet-18)."""
    config = resolve_config({"model.name": name, "model.backbone": "resnet18", "model.pretrained": False,
                             "model.layers": [1, 2], "data.root": str(demo_root), "data.image_size": 64,
                             "data.batch_size": 8, "output_dir": str(tmp_path), **overrides})
    torch.manual_seed(0)
    dataloader = build_dataloader(config)
    modeler = build_modeler(config, build_model(config))
    trainer = build_trainer(config, modeler, dataloader, tmp_path, torch.device("cpu"))
    calls = []
    trainer.modeler.model.extractor.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    trainer.fit()
    _, predictions = trainer.evaluate()
    return trainer, predictions, calls


@pytest.mark.parametrize("name, extra", [("padim", {}), ("patchcore", {}), ("dfm", {"model.layers": [2]})])
def test_cached_and_uncached_paths_give_identical_scores_and_maps(demo_root, tmp_path, name, extra):
    """No cache at all, a cold cache and a warm one: bit-identical maps, scores and threshold; the backbone
    sees each image once per run (plus one 1-image shape probe), and not at all once the cache is warm."""
    cache = {"data.cache_dir": str(tmp_path / "cache"), **extra}
    plain, reference, plain_calls = _fitted(demo_root, tmp_path, name, **{"data.cache": False,
                                                                          "train.feature_cache_mb": 0, **extra})
    cold, first, cold_calls = _fitted(demo_root, tmp_path, name, **cache)
    warm, second, warm_calls = _fitted(demo_root, tmp_path, name, **cache)
    for predictions in (first, second):
        assert torch.equal(predictions.maps, reference.maps) and torch.equal(predictions.scores, reference.scores)
        assert torch.equal(predictions.masks, reference.masks) and predictions.image_paths == reference.image_paths
    assert plain.threshold == cold.threshold == warm.threshold
    train, test = len(plain.dataloader.train_dataset), len(plain.dataloader.test_dataset)
    assert sum(plain_calls) == 2 * train + test + 1  # fit, in-sample threshold pass, test; the shape probe
    assert sum(cold_calls) == train + test + 1 and sum(warm_calls) == 1
    assert len(list((tmp_path / "cache" / "images").rglob("*.npy"))) == train + test + len(
        [s for s in plain.dataloader.test_dataset.samples if s.mask_path is not None])


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_test_features_computed_during_the_fit_score_as_computed_after_it(demo_root, tmp_path, name):
    """With no worker processes the test split's backbone pass runs in a background thread while the fit's
    statistics (or coreset) and the threshold pass run: maps, scores and threshold equal those of the
    sequential path without any feature cache, and the main thread never ran the test images."""
    plain, reference, _ = _fitted(demo_root, tmp_path, name, **{"data.cache": False, "train.feature_cache_mb": 0})
    threads = []
    original = FeatureCacheMixin._run_backbone

    def recording(self, subset, *args, **kwargs):
        threads.append((args[2], threading.current_thread() is threading.main_thread()))
        return original(self, subset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureCacheMixin, "_run_backbone", recording)
        ahead, predictions, _ = _fitted(demo_root, tmp_path, name, **{"data.num_workers": 0,
                                                                       "data.cache_dir": str(tmp_path / "cache")})
    assert threads == [("train", True), ("test", False)]
    assert torch.equal(predictions.maps, reference.maps) and torch.equal(predictions.scores, reference.scores)
    assert torch.equal(predictions.masks, reference.masks) and ahead.threshold == plain.threshold


def test_batchnorm_pass_and_original_masks_through_the_feature_cache(demo_root, tmp_path):
    """PatchCore's official batch-norm pass runs before features are cached (identical maps with and without
    the caches) and keys them apart from the plain backbone's; evaluation through cached features still
    reads ground truth from the original masks at data.mask_size."""
    quirk = {"model.official_batchnorm_pass": True, "data.mask_size": 128}
    cache = {"data.cache_dir": str(tmp_path / "cache")}
    _, reference, _ = _fitted(demo_root, tmp_path, "patchcore", **quirk, **{"data.cache": False,
                                                                             "train.feature_cache_mb": 0})
    for _ in ("cold", "warm"):
        _, cached, _ = _fitted(demo_root, tmp_path, "patchcore", **quirk, **cache)
        assert torch.equal(cached.maps, reference.maps) and torch.equal(cached.scores, reference.scores)
        assert len(cached.eval_masks) == len(reference.eval_masks) > 0
        assert all(np.array_equal(a, b) and a.shape == (128, 128) for a, b in zip(cached.eval_masks, reference.eval_masks))
        assert any(mask.any() for mask in cached.eval_masks)
    _, plain, _ = _fitted(demo_root, tmp_path, "patchcore", **cache)  # no pass: other statistics, other key
    assert not torch.equal(plain.maps, reference.maps)
    assert len([folder for folder in (tmp_path / "cache" / "features").iterdir() if folder.is_dir()]) == 2


def _write(path, seed, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _dataset(paths, cache_dir, **data):
    config = {"image_size": 16, "crop_ratio": 1.0, "interpolation": "bilinear", "normalize": "none",
              "cache": True, "cache_dir": str(cache_dir), **data}
    return AnomalyDataset([Sample(path, 0, "good") for path in paths], config)


def test_an_edited_image_or_another_protocol_is_never_served_stale(tmp_path):
    path = tmp_path / "data" / "a.png"
    _write(path, 0)
    first = _dataset([path], tmp_path / "cache").load_image(0)
    _write(path, 1)  # same size in bytes is not guaranteed; the time stamp changes in any case
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    edited = _dataset([path], tmp_path / "cache").load_image(0)
    plain = _dataset([path], tmp_path / "cache", cache=False).load_image(0)
    assert torch.equal(edited, plain) and not torch.equal(first, edited)
    bicubic = _dataset([path], tmp_path / "cache", interpolation="bicubic").load_image(0)
    assert torch.equal(bicubic, _dataset([path], tmp_path / "cache", interpolation="bicubic", cache=False).load_image(0))
    assert len(list((tmp_path / "cache" / "images").rglob("*.npy"))) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def _fill(paths, cache_dir, queue):
    dataset = _dataset(paths, cache_dir)
    queue.put([dataset.load_image(i).numpy().tobytes() for i in range(len(dataset))])


def test_two_processes_filling_the_cache_at_once_leave_complete_entries(tmp_path):
    paths = [tmp_path / "data" / f"{i}.png" for i in range(12)]
    for seed, path in enumerate(paths):
        _write(path, seed)
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    queue = context.Queue()
    workers = [context.Process(target=_fill, args=(paths, tmp_path / "cache", queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    expected = [_dataset(paths, tmp_path, cache=False).load_image(i).numpy().tobytes() for i in range(12)]
    assert results == [expected, expected]
    assert [_dataset(paths, tmp_path / "cache").load_image(i).numpy().tobytes() for i in range(12)] == expected
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 12 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_unwritable_cache_folder_warns_once_and_computes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ArrayStore(blocker / "images")
    with pytest.warns(UserWarning, match="not writable"):
        assert store.get("ab12", lambda: np.arange(3)).tolist() == [0, 1, 2]
    assert store.get("ab12", lambda: np.arange(4)).tolist() == [0, 1, 2, 3]  # no second warning, no file


def test_cache_root_follows_the_config_then_the_environment(tmp_path, monkeypatch):
    assert cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.setenv("ANOMALY_FRAMEWORK_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == default_cache_root() == tmp_path / "env"
    monkeypatch.delenv("ANOMALY_FRAMEWORK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "anomaly_framework"


def test_eviction_drops_the_least_recently_used_files_first(tmp_path):
    for index, size in enumerate((300_000, 400_000, 500_000)):
        path = tmp_path / f"{index}.npy"
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + index, 1000 + index))
    evict(tmp_path, budget_mb=0.9)  # 943,718 bytes: the oldest file must go, the other two fit
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["1.npy", "2.npy"]
    evict(tmp_path, budget_mb=0.4)
    assert [p.name for p in tmp_path.glob("*.npy")] == []


def test_extractor_key_follows_weights_and_layers():
    torch.manual_seed(0)
    extractor = TimmFeatureExtractor("resnet18", [1, 2], pretrained=False)
    same = TimmFeatureExtractor("resnet18", [1, 2], pretrained=False)
    same.load_state_dict(extractor.state_dict())
    other_layers = TimmFeatureExtractor("resnet18", [1, 3], pretrained=False)
    cpu = torch.device("cpu")
    assert extractor_key(extractor, cpu) == extractor_key(same, cpu) != extractor_key(other_layers, cpu)
    with torch.no_grad():
        same.model.conv1.weight[0, 0, 0, 0] += 1e-6
    assert extractor_key(same, cpu) != extractor_key(extractor, cpu)
