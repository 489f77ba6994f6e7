"""Regenerates tests/fixtures/parity/simplenet.npz and supersimplenet.npz by running the official code.

SimpleNet (DonaldRR/SimpleNet) runs ``SimpleNet.load/_embed/_train_discriminator/_predict`` on a stub
backbone (make_fixtures' ``_IndexedStub``); SuperSimpleNet (blaz-r/SuperSimpleNet) runs its model classes
and ``train.train`` (with its training-only imports stubbed) on a stub feature extractor. Two optimiser
steps each, with the Gaussian noise and (SuperSimpleNet) the Perlin masks fixed by replacing
``torch.normal`` and ``AnomalyGenerator.generate_perlin`` for those steps; every loss passed to
``backward`` is recorded. The weight decays are raised to 1.0 / 0.5 in the fixture (the defaults, 0.01 and
1e-5, move a weight by less than the 1e-5 tolerance in two steps) so that the tests see which decay is
coupled and which decoupled. SuperSimpleNet's hidden width is 32 instead of its hard-coded 1024, for size.

The whole-path fixtures e2e_simplenet.npz / e2e_supersimplenet.npz: the official models on a torchvision
resnet18 (layer2 + layer3) with the seeded weights of tests/parity_inputs.py (heads seeded per official
tensor name, small widths), scoring fixed 64-pixel images with the official evaluation code (``_predict``;
``forward`` in eval mode and ``train.test``'s sigmoid of the score).

Run it in the parity virtualenv (the official code's torch, torchvision, scipy, scikit-learn):
    python tools/parity/make_simplenet_fixtures.py --simplenet DIR --supersimplenet DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "tests")]
from make_fixtures import OUT, _half, _IndexedStub, _indexed_images  # noqa: E402
from parity_inputs import parity_images, seeded_state, seeded_tensors, to_tensor  # noqa: E402

OFFICIAL = {
    "simplenet": ("DonaldRR/SimpleNet", "351a2b8d4e8cfc944dbccbf9bc6ceda930c6f26b"),
    "supersimplenet": ("blaz-r/SuperSimpleNet", "60d1e742c836bdd5cd24388ffb2250059faa2ec4"),
}
SIZE = 32
E2E_SIZE, E2E_HIDDEN = 64, 32  # whole-path fixtures: 64-pixel images, heads 32 wide
DECAY_HEADS, DECAY_ADAPTOR = 0.5, 1.0


def _save(name: str, functions: str, prefix: str = "", **arrays) -> None:
    """``<prefix><name>.npz`` with its ``source`` (``prefix="e2e_"`` for the whole-path fixtures)."""
    repo, commit = OFFICIAL[name]
    source = json.dumps({"repository": repo, "commit": commit, "functions": functions,
                         "weight_decay": {"heads": DECAY_HEADS, "adaptor": DECAY_ADAPTOR}})
    path = OUT / f"{prefix}{name}.npz"
    np.savez_compressed(path, source=np.array(source), **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")


def _seeded_resnet18() -> nn.Module:
    """torchvision's resnet18 with the seeded weights (the same values per name as our timm backbone)."""
    import torchvision

    backbone = torchvision.models.resnet18(weights=None)
    backbone.load_state_dict(seeded_state(backbone))
    return backbone.eval()


def _seed_named(modules: dict[str, nn.Module]) -> None:
    """Seeded values for every tensor of each module, drawn per ``<key>.<tensor name>``."""
    for key, module in modules.items():
        names = {f"{key}.{name}": tensor for name, tensor in module.state_dict().items()}
        values = seeded_tensors(names)
        module.load_state_dict({name[len(key) + 1:]: values[name] for name in names})


def _placeholder(attribute: str) -> type:
    """Any public name of a stubbed module: a class that accepts anything."""
    if attribute.startswith("__"):
        raise AttributeError(attribute)
    return type(attribute, (), {"__init__": lambda self, *args, **kwargs: None})


def _stub_modules(names: list[str]) -> None:
    """Empty stand-ins for imports the exercised functions never use (logging, data modules, metrics)."""
    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = _placeholder
        sys.modules[name] = module


@contextlib.contextmanager
def _recorded(noises: list[torch.Tensor], losses: list[torch.Tensor]):
    """``torch.normal`` hands out ``noises`` in order; every ``Tensor.backward`` records its loss."""
    normal, backward = torch.normal, torch.Tensor.backward
    queue = list(noises)
    torch.normal = lambda *args, **kwargs: queue.pop(0).clone()

    def recording(self, *args, **kwargs):
        losses.append(self.detach().clone())
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = recording
    try:
        yield
    finally:
        torch.normal, torch.Tensor.backward = normal, backward


def _state(module: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


# -- SimpleNet ------------------------------------------------------------------------------------------
def simplenet(checkout: Path) -> None:
    """layer2 + layer3 stub features (8 and 16 channels at 4×4 and 2×2), pretrain/target dimension 48,
    one linear adaptor (pre_proj 1), discriminator 2 layers × 32, noise σ 0.015, margin 0.5."""
    _stub_modules(["torch.utils.tensorboard", "psutil"])
    sys.path.insert(0, str(checkout))
    import simplenet as official

    g = torch.Generator().manual_seed(11)
    n_train, n_test = 4, 2
    shapes = [(8, 4), (16, 2)]
    features = [_half(g, n_train + n_test, c, s, s) for c, s in shapes]
    features[0][n_train + 1, :, 1:3, 1:3] += 2.0
    features = [f.half().float() for f in features]
    stub = _IndexedStub(["layer2", "layer3"], features)
    torch.manual_seed(0)
    model = official.SimpleNet(torch.device("cpu"))
    model.load(stub, ["layer2", "layer3"], torch.device("cpu"), (3, SIZE, SIZE), 48, 48, patchsize=3,
               meta_epochs=1, gan_epochs=1, noise_std=0.015, dsc_layers=2, dsc_hidden=32, dsc_margin=0.5,
               pre_proj=1)
    model.dsc_opt.param_groups[0]["weight_decay"] = DECAY_HEADS
    model.proj_opt.param_groups[0]["weight_decay"] = DECAY_ADAPTOR
    model.logger = types.SimpleNamespace(logger=types.SimpleNamespace(add_scalar=lambda *a: None), step=lambda: None,
                                         g_iter=0)
    initial = {"adaptor": _state(model.pre_projection), "discriminator": _state(model.discriminator)}
    images = _indexed_images(n_train + n_test, SIZE)
    embedding = model._embed(images[n_train:])[0].detach().numpy()
    scores: list[torch.Tensor] = []
    model.discriminator.register_forward_hook(lambda module, args, output: scores.append(output.detach().clone()))
    rows = 2 * 4 * 4
    noises = [_half(g, rows, 48) * 0.015 for _ in range(2)]
    losses: list[torch.Tensor] = []
    with _recorded(noises, losses):
        model._train_discriminator([{"image": images[0:2]}, {"image": images[2:4]}])
    image_scores, maps, _ = model._predict(images[n_train:])
    _save(
        "simplenet",
        "simplenet.SimpleNet.load/_embed/_train_discriminator/_predict (common.Preprocessing/MeanMapper/"
        "Aggregator/RescaleSegmentor, Projection, Discriminator, PatchMaker)",
        **{f"layer{i + 2}": f.half().numpy() for i, f in enumerate(features)}, size=np.array(SIZE),
        **{f"initial_adaptor.{k}": v for k, v in initial["adaptor"].items()},
        **{f"initial_discriminator.{k}": v for k, v in initial["discriminator"].items()},
        **{f"trained_adaptor.{k}": v for k, v in _state(model.pre_projection).items()},
        **{f"trained_discriminator.{k}": v for k, v in _state(model.discriminator).items()},
        embedding_test=embedding, noises=np.stack([n.numpy() for n in noises]),
        train_scores=np.stack([s.numpy() for s in scores[:2]]), losses=np.stack([l.numpy() for l in losses]),
        image_scores=np.asarray(image_scores), maps=np.stack(maps),
    )


# -- SuperSimpleNet -------------------------------------------------------------------------------------
class _DictStub(nn.Module):
    """create_feature_extractor's stand-in: stored layer2/layer3 maps of image k (its pixel [0, 0, 0] = k)."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = images[:, 0, 0, 0].long().clamp(0, len(self.features[0]) - 1)
        return {"layer2": self.features[0][rows], "layer3": self.features[1][rows]}


def _perlin_draws(generator, count: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """``generate_perlin(count)`` under torch seed ``seed``, and the same torch draws replayed: per mask the
    two scale exponents, the uniform angle draws and the emptying draw."""
    torch.manual_seed(seed)
    masks = generator.generate_perlin(count).numpy()
    torch.manual_seed(seed)
    draws = []
    for _ in range(count):
        exponents = [int(torch.randint(0, 6, (1,))[0]) for _ in range(2)]
        uniform = torch.rand(2 ** exponents[0] + 1, 2 ** exponents[1] + 1)
        draws.append({"exponents": exponents, "uniform": uniform.numpy(), "chance": float(torch.rand(1)[0])})
    return masks, draws


def supersimplenet(checkout: Path) -> None:
    """Stub layer2/layer3 (4 channels each at 4×4 and 2×2; an 8×8 grid of 8 channels after the 2× upscale),
    hidden width 32, the unsupervised MVTec config; Perlin masks on a 24×20 grid (next powers of two 32)."""
    for name in [name for name in sys.modules if name.split(".")[0] in ("common", "metrics", "utils")]:
        del sys.modules[name]  # SimpleNet's top-level modules of the same names, when both run in one process
    _stub_modules(["pytorch_lightning", "torchmetrics", "anomalib", "anomalib.utils", "anomalib.utils.metrics",
                   "datamodules", "datamodules.ksdd2", "datamodules.sensum", "datamodules.mvtec", "datamodules.visa",
                   "common.visualizer", "common.results_writer", "wandb"])
    sys.path.insert(0, str(checkout))
    import torchvision.models
    import model.feature_extractor as extractor_module
    import model.supersimplenet as official
    import train as official_train

    g = torch.Generator().manual_seed(21)
    n_train, n_test = 4, 2
    features = [_half(g, n_train + n_test, 4, 4, 4), _half(g, n_train + n_test, 4, 2, 2)]
    features[0][n_train + 1, :, 1:3, 1:3] += 2.0
    features = [f.half().float() for f in features]
    torchvision.models.stub_backbone = lambda weights=None: nn.Identity()
    extractor_module.create_feature_extractor = lambda model, return_nodes: _DictStub(features)
    config = {"backbone": "stub_backbone", "layers": ["layer2", "layer3"], "patch_size": 3, "noise": True,
              "perlin": True, "no_anomaly": "empty", "bad": True, "overlap": True, "noise_std": 0.015,
              "perlin_thr": 0.2, "epochs": 300, "seg_lr": 0.0002, "dec_lr": 0.0002, "adapt_lr": 0.0001,
              "gamma": 0.4, "stop_grad": True}
    torch.manual_seed(0)
    model = official.SuperSimpleNet((SIZE, SIZE), config)
    model.discriminator = official.Discriminator(8, 32, model.fw, model.fh, config)
    for parameter in model.feature_adaptor.parameters():  # stored as float16: round the initial weights
        parameter.data = parameter.data.half().float()
    for parameter in model.discriminator.parameters():
        parameter.data = parameter.data.half().float()
    initial = _state(model)
    get_optimizers = model.get_optimizers

    def with_fixture_decay():
        optimizer, scheduler = get_optimizers()
        for group, decay in zip(optimizer.param_groups, (DECAY_ADAPTOR, DECAY_HEADS, DECAY_HEADS)):
            group["weight_decay"] = decay
        return optimizer, scheduler

    model.get_optimizers = with_fixture_decay
    images = _indexed_images(n_train + n_test, SIZE)
    masks = [(_half(g, 4, 1, 8, 8) > 0.3).float() for _ in range(2)]
    masks[1][0] = 0  # one noised copy left normal, as the official "empty" draw does
    queue = list(masks)
    model.anomaly_generator.generate_perlin = lambda count: queue.pop(0)
    noises = [_half(g, 4, 8, 8, 8) * 0.015 for _ in range(2)]
    outputs: list[tuple] = []
    forward = model.forward  # train.train calls model.forward directly, past any forward hook

    def recording_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        outputs.append(tuple(o.detach().clone() for o in output))
        return output

    model.forward = recording_forward
    losses: list[torch.Tensor] = []
    batches = [{"image": images[i:i + 2], "mask": torch.zeros(2, SIZE, SIZE), "label": torch.zeros(2)} for i in (0, 2)]
    test_batch = {"image": images[n_train:], "mask": torch.zeros(2, SIZE, SIZE), "label": torch.zeros(2),
                  "image_path": ["a", "b"], "mask_path": ["a", "b"]}
    datamodule = types.SimpleNamespace(train_dataloader=lambda: batches, test_dataloader=lambda: [test_batch])
    with _recorded(noises, losses):
        official_train.train(model, 1, datamodule, "cpu", {}, {}, clip_grad=False, eval_step_size=1)
    model.eval()
    with torch.no_grad():
        anomaly_map, score = model(images[n_train:])
    perlin = official.AnomalyGenerator(0, 0.015, 24, 20, 8, config)
    perlin_masks, draws = _perlin_draws(perlin, 6, seed=3)
    _save(
        "supersimplenet",
        "model.supersimplenet.SuperSimpleNet/FeatureExtractor/FeatureAdaptor/Discriminator/AnomalyGenerator/"
        "AnomalyMapGenerator, train.train (truncated L1 + common.loss.focal_loss, AdamW groups)",
        **{f"layer{i + 2}": f.half().numpy() for i, f in enumerate(features)}, size=np.array(SIZE),
        **{f"initial.{k}": v.astype(np.float16) if v.dtype == np.float32 else v for k, v in initial.items()
           if not k.startswith("feature_extractor")},
        **{f"trained.{k}": v for k, v in _state(model).items() if not k.startswith("feature_extractor")},
        features_test=model.feature_extractor(images[n_train:]).numpy(),
        masks=np.stack([m.numpy() for m in masks]), noises=np.stack([n.numpy() for n in noises]),
        train_maps=np.stack([o[0].numpy() for o in outputs[:2]]), train_scores=np.stack([o[1].numpy() for o in outputs[:2]]),
        losses=np.stack([l.numpy() for l in losses]), anomaly_map=anomaly_map.numpy(), score=score.numpy(),
        perlin_masks=perlin_masks, perlin_exponents=np.array([d["exponents"] for d in draws]),
        perlin_uniform=np.concatenate([d["uniform"].ravel() for d in draws]),
        perlin_chance=np.array([d["chance"] for d in draws]),
    )


def simplenet_end_to_end(checkout: Path) -> None:
    """SimpleNet.load on a seeded torchvision resnet18 (layer2 + layer3), pretrain/target 48, discriminator
    2 × 32, heads seeded by official name (batch norm in eval mode), then ``_predict`` on 4 fixed images."""
    import tempfile

    import simplenet as official
    from datasets.mvtec import DatasetSplit, MVTecDataset
    from preprocessing_fixtures import COUNT, coarse_summary, mvtec_pngs

    with tempfile.TemporaryDirectory() as tmp:  # run.sh's MVTec transform: resize 329, centre crop 288
        dataset = MVTecDataset(str(mvtec_pngs(Path(tmp))), "bottle", resize=329, imagesize=288, split=DatasetSplit.TRAIN)
        preprocessing = coarse_summary([dataset[i]["image"] for i in range(COUNT)])
    model = official.SimpleNet(torch.device("cpu"))
    model.load(_seeded_resnet18(), ["layer2", "layer3"], torch.device("cpu"), (3, E2E_SIZE, E2E_SIZE), 48, 48,
               patchsize=3, dsc_layers=2, dsc_hidden=E2E_HIDDEN, pre_proj=1)
    _seed_named({"adaptor": model.pre_projection, "discriminator": model.discriminator})
    scores, maps, _ = model._predict(to_tensor(parity_images(4, E2E_SIZE, seed=9)).contiguous())
    _save("simplenet", prefix="e2e_",
          functions="SimpleNet.load(resnet18 seeded, layer2+layer3, 48, 48, patchsize 3, dsc 2 x 32, pre_proj 1)._predict "
                    "(NetworkFeatureAggregator, PatchMaker, Preprocessing/Aggregator, Projection, Discriminator, "
                    "RescaleSegmentor: bilinear upsampling + gaussian_filter sigma 4; image score = max patch score); "
                    "preprocessing_*: datasets.mvtec.MVTecDataset(resize 329, imagesize 288) on the PNG files of "
                    "tools/parity/preprocessing_fixtures.py",
          maps=np.stack(maps).astype(np.float32), scores=np.asarray(scores, dtype=np.float32), **preprocessing)


def supersimplenet_end_to_end(checkout: Path) -> None:
    """SuperSimpleNet((64, 64), the unsupervised config) on a seeded torchvision resnet18, segmentation head
    32 wide, every head seeded by official name, forward in eval mode; image score = sigmoid(score) as
    train.test stores it."""
    import torchvision.models
    from torchvision.models.feature_extraction import create_feature_extractor

    import model.feature_extractor as extractor_module
    import model.supersimplenet as official

    extractor_module.create_feature_extractor = create_feature_extractor  # supersimplenet() stubbed it
    torchvision.models.seeded_resnet18 = lambda weights=None: _seeded_resnet18()
    config = {"backbone": "seeded_resnet18", "layers": ["layer2", "layer3"], "patch_size": 3, "noise": True,
              "perlin": True, "no_anomaly": "empty", "bad": True, "overlap": True, "noise_std": 0.015,
              "perlin_thr": 0.2, "stop_grad": True}
    model = official.SuperSimpleNet((E2E_SIZE, E2E_SIZE), config)
    model.discriminator = official.Discriminator(model.feature_extractor.feature_dim[0], E2E_HIDDEN, model.fw,
                                                 model.fh, config)
    _seed_named({"feature_adaptor": model.feature_adaptor, "discriminator": model.discriminator})
    model.eval()
    with torch.no_grad():
        anomaly_map, score = model(to_tensor(parity_images(4, E2E_SIZE, seed=10)).contiguous())
    _save("supersimplenet", prefix="e2e_",
          functions="model.supersimplenet.SuperSimpleNet((64, 64), unsupervised config; resnet18 seeded, Discriminator "
                    "hidden 32).forward in eval mode (FeatureExtractor, FeatureAdaptor, Discriminator, "
                    "AnomalyMapGenerator); scores = torch.sigmoid(score) as train.test",
          maps=anomaly_map[:, 0].numpy(), scores=torch.sigmoid(score).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simplenet", type=Path, help=f"checkout of {OFFICIAL['simplenet'][0]} at {OFFICIAL['simplenet'][1][:10]}")
    parser.add_argument("--supersimplenet", type=Path,
                        help=f"checkout of {OFFICIAL['supersimplenet'][0]} at {OFFICIAL['supersimplenet'][1][:10]}")
    args = parser.parse_args()
    if args.simplenet:
        simplenet(args.simplenet.resolve())
        simplenet_end_to_end(args.simplenet.resolve())
        sys.path.remove(str(args.simplenet.resolve()))  # its common.py would shadow SuperSimpleNet's common/
    if args.supersimplenet:
        supersimplenet(args.supersimplenet.resolve())
        supersimplenet_end_to_end(args.supersimplenet.resolve())


if __name__ == "__main__":
    main()
