"""Regenerates tests/fixtures/parity/cflow.npz by running gudovskiy/cflow-ad's code on small fixed inputs.

Stages, each the official function run unchanged: ``model.positionalencoding2d``; ``model.load_encoder_arch``
(resnet18 of its custom_models with reflection padding, weights filled by ``sine_fill_``, which the test
applies to ours by name); ``model.freia_cflow_head`` (FrEIA AllInOneBlock, random weights) and
``utils.get_logp`` / the training loss; ``custom_models.utils`` learning rates over a whole schedule; and
``train.train`` itself for one meta-epoch on a stub encoder (fixed feature maps) and stub datasets: the
initial and trained decoder weights, the permutations its fiber batches drew, the order of its image
batches, its per-level test log-likelihoods, and the map and scores it hands to ``roc_auc_score``.

The whole-path fixture e2e_cflow.npz: ``train.train`` with its training step skipped, on a seeded
reflection-padded resnet18 encoder and seeded decoders (tests/parity_inputs.py), scoring 4 fixed 64-pixel
images: per-level test log-likelihoods, the map and the image scores it hands to ``roc_auc_score``.

Run it in a virtualenv with the official dependencies (FrEIA, scikit-image, scikit-learn, matplotlib):
    python tools/parity/make_cflow_fixtures.py --cflow DIR [--freia DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools" / "parity")]
from parity_inputs import parity_images, seeded_flow_tensors, seeded_state, to_tensor  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity" / "cflow.npz"
OFFICIAL = ("gudovskiy/cflow-ad", "b2ebf9e673a0aa46992a3b18367ec066a57bba89")
FREIA = ("vislearn/FrEIA (VLL-HD/FrEIA), as installed in the parity virtualenv", "FrEIA 0.2")
# The stub encoder's levels: (channels, side) of a 32-pixel input; batches of 2 training images give each level
# at least 256 fibers (N of the official code).
LEVELS = ((6, 16), (7, 12), (8, 12))
CONDITION, BLOCKS, CROP = 8, 8, 32


def sine_fill_(module: nn.Module) -> None:
    """Deterministic weights by name, independent of any random generator: every floating tensor of
    the state dict gets sin(0.37·i + phase(name)), scaled as a He-initialised convolution for
    ``*.weight`` of rank 4, around 1 for batch-norm scales and variances."""
    state = module.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            phase = sum(name.encode()) % 97
            wave = torch.sin(torch.arange(tensor.numel(), dtype=torch.float64) * 0.37 + phase).reshape(tensor.shape)
            if name.endswith("running_var"):
                value = 1.0 + 0.2 * wave.square()
            elif tensor.dim() == 4:
                value = wave * math.sqrt(2.0 / (tensor.shape[1] * tensor.shape[2] * tensor.shape[3]))
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * wave
            else:
                value = 0.1 * wave
            tensor.copy_(value.to(tensor.dtype))


def _import(checkout: Path, name: str):
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return __import__(name)


def _half(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).half().float()


def _packed(key: str, state: dict) -> dict:
    """A decoder's state as one float32 vector ``key`` and its layout ``key_layout`` (JSON: name, size),
    without the inverse permutations (the transposes): one array instead of hundreds keeps the file small."""
    names = [name for name in state if "w_perm_inv" not in name]
    layout = json.dumps([[name, state[name].numel()] for name in names])
    return {key: torch.cat([state[name].flatten() for name in names]).numpy(), f"{key}_layout": np.array(layout)}


def _options(**extra) -> types.SimpleNamespace:
    """The official ``c`` as main.py sets it (lr schedule rules included) for the given run."""
    c = types.SimpleNamespace(**{**dict(lr=2e-4, lr_decay_rate=0.1, lr_warm_epochs=2, lr_warm=True, lr_cosine=True,
                                        clamp_alpha=1.9, condition_vec=CONDITION, coupling_blocks=BLOCKS,
                                        dec_arch="freia-cflow", enc_arch="resnet18", pool_layers=3, meta_epochs=25,
                                        sub_epochs=8), **extra})
    c.lr_decay_epochs = [i * c.meta_epochs // 100 for i in [50, 75, 90]]
    c.lr_warmup_from = c.lr / 10.0
    eta_min = c.lr * (c.lr_decay_rate ** 3)
    c.lr_warmup_to = eta_min + (c.lr - eta_min) * (1 + math.cos(math.pi * c.lr_warm_epochs / c.meta_epochs)) / 2
    return c


def encoding_and_encoder(checkout: Path, arrays: dict) -> None:
    model = _import(checkout, "model")
    arrays["pe_16_3_5"] = model.positionalencoding2d(16, 3, 5).numpy()
    arrays["pe_128_2_3"] = model.positionalencoding2d(128, 2, 3).numpy()
    original = model.resnet18
    model.resnet18 = lambda pretrained, progress: original(pretrained=False)  # no download: weights below
    encoder, pool_layers, _ = model.load_encoder_arch(_options(), 3)
    sine_fill_(encoder)
    image = _half(torch.Generator().manual_seed(3), 1, 3, 48, 48)
    encoder.eval()
    with torch.no_grad():
        encoder(image)
    arrays["encoder_image"] = image.half().numpy()
    for i, layer in enumerate(pool_layers):
        arrays[f"encoder_feature{i}"] = model.activation[layer].numpy()


def flow_and_loss(checkout: Path, arrays: dict) -> None:
    model, utils = _import(checkout, "model"), _import(checkout, "utils")
    g = torch.Generator().manual_seed(5)
    np.random.seed(5)
    decoder = model.freia_cflow_head(_options(), 7)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "subnet" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
            elif "global_scale" in name:
                parameter.add_(torch.randn(parameter.shape, generator=g))
            elif "global_offset" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    fibers, conditions = _half(g, 10, 7), _half(g, 10, CONDITION)
    with torch.no_grad():
        z, log_det = decoder(fibers, [conditions])
        log_prob = utils.get_logp(7, z, log_det) / 7
        loss = -torch.nn.LogSigmoid()(log_prob)
    arrays.update(flow_fibers=fibers.half().numpy(), flow_conditions=conditions.half().numpy(), flow_z=z.numpy(),
                  flow_log_det=log_det.numpy(), flow_log_prob=log_prob.numpy(), flow_loss=loss.mean().numpy(),
                  **_packed("flow", decoder.state_dict()))


def learning_rates(checkout: Path, arrays: dict) -> None:
    helpers = _import(checkout, "custom_models.utils")
    c = _options()
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=c.lr)
    batches, rates = 5, []
    for meta in range(c.meta_epochs):
        helpers.adjust_learning_rate(c, optimizer, meta)
        for i in range(batches * c.sub_epochs):
            rates.append(helpers.warmup_learning_rate(c, meta, i, batches * c.sub_epochs, optimizer))
    arrays.update(lr_batches=np.array(batches), lr_rates=np.array(rates))


class _StubEncoder(nn.Module):
    """Levels layer2..layer4 (Sequentials, so the official hooks attach) returning stored feature maps:
    image k (its pixel [0, 0, 0] = k) gets row k."""

    def __init__(self, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = features
        for name in ("layer2", "layer3", "layer4"):
            setattr(self, name, nn.Sequential(nn.Identity()))

    def forward(self, images: torch.Tensor):
        rows = images[:, 0, 0, 0].long()
        return [getattr(self, f"layer{i + 2}")(feature[rows]) for i, feature in enumerate(self.features)]


class _StubImages(torch.utils.data.Dataset):
    def __init__(self, labels: list[int], masks: torch.Tensor) -> None:
        self.labels, self.masks = labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.full((3, CROP, CROP), float(index)), self.labels[index], self.masks[index]


def official_train(checkout: Path, arrays: dict) -> None:
    """train.train for one meta-epoch of one sub-epoch: 4 training images in batches of 2, 3 test images."""
    model, train = _import(checkout, "model"), _import(checkout, "train")
    g = torch.Generator().manual_seed(7)
    train_features = [_half(g, 4, c, s, s) for c, s in LEVELS]
    test_features = [_half(g, 3, c, s, s) for c, s in LEVELS]
    masks = (torch.rand(3, 1, CROP, CROP, generator=g) > 0.8).float()
    masks[0] = 0
    pool_layers = ["layer" + str(i) for i in range(3)]
    encoders = {"train": _StubEncoder(train_features), "test": _StubEncoder(test_features)}
    state = {"phase": "train", "batches": [], "perms": [], "roc": [], "decoders": None}

    class Switch(nn.Module):  # the official code calls the one encoder for training and testing
        def __init__(self):
            super().__init__()
            for i, name in enumerate(("layer2", "layer3", "layer4")):
                encoder_layers = [getattr(encoders[k], name) for k in ("train", "test")]
                for layer in encoder_layers:
                    layer.register_forward_hook(model.get_activation(pool_layers[i]))

        def forward(self, images):
            if state["phase"] == "train":
                state["batches"].append(images[:, 0, 0, 0].long().numpy())
            return encoders[state["phase"]](images)

    train.load_encoder_arch = lambda c, L: (Switch(), pool_layers, [c for c, _ in LEVELS])
    train.MVTecDataset = lambda c, is_train: (_StubImages([0] * 4, torch.zeros(4, 1, CROP, CROP)) if is_train
                                              else _StubImages([0, 1, 1], masks))
    train.save_weights = train.save_results = lambda *args, **kwargs: None
    original_randperm = torch.randperm

    def randperm(n, *args, **kwargs):
        perm = original_randperm(n, *args, **kwargs)
        state["perms"].append(perm.numpy())
        return perm

    train.torch.randperm = randperm
    original_train_epoch, original_test_epoch = train.train_meta_epoch, train.test_meta_epoch

    def train_epoch(c, epoch, loader, encoder, decoders, *args):
        state["initial"] = [{k: v.clone() for k, v in d.state_dict().items()} for d in decoders]
        return original_train_epoch(c, epoch, loader, encoder, decoders, *args)

    def test_epoch(c, epoch, loader, encoder, decoders, *args):
        state["phase"] = "test"
        state["trained"] = [{k: v.clone() for k, v in d.state_dict().items()} for d in decoders]
        result = original_test_epoch(c, epoch, loader, encoder, decoders, *args)
        state["test_dist"] = result[3]
        return result

    train.train_meta_epoch, train.test_meta_epoch = train_epoch, test_epoch
    train.roc_auc_score = lambda truth, scores: state["roc"].append(np.asarray(scores)) or 0.5
    torch.manual_seed(11)
    np.random.seed(11)
    c = _options(meta_epochs=1, sub_epochs=1, dataset="mvtec", action_type="norm-train", checkpoint="", batch_size=2,
                 workers=0, use_cuda=False, device=torch.device("cpu"), crp_size=(CROP, CROP), model="stub",
                 class_name="stub", verbose=False, hide_tqdm_bar=True, pro=False, viz=False)
    train.train(c)
    torch.randperm = original_randperm
    for level, (initial, trained) in enumerate(zip(state["initial"], state["trained"])):
        arrays[f"train_feature{level}"] = train_features[level].half().numpy()
        arrays[f"test_feature{level}"] = test_features[level].half().numpy()
        arrays[f"test_log_prob{level}"] = np.asarray(state["test_dist"][level], dtype=np.float32)
        arrays.update(_packed(f"initial{level}", initial))
        arrays.update(_packed(f"trained{level}", {k: v for k, v in trained.items() if "w_perm" not in k}))
    arrays.update(train_batch_order=np.concatenate(state["batches"]), train_perms=np.concatenate(state["perms"]).astype(np.int16),
                  train_perm_sizes=np.array([len(p) for p in state["perms"]]), test_masks=masks.numpy().astype(bool),
                  test_scores=state["roc"][0], test_map=state["roc"][1].reshape(3, CROP, CROP).astype(np.float32))


E2E_SIZE = 64


def _seeded_decoders(make_decoder):
    """``make_decoder`` wrapped: the k-th decoder made gets the seeded values of ``decoders.<k>.<FrEIA name>``."""
    made = []

    def seeded(c, dim_in):
        decoder = make_decoder(c, dim_in)
        prefix = f"decoders.{len(made)}."
        values = seeded_flow_tensors({prefix + k: v for k, v in decoder.state_dict().items()})
        decoder.load_state_dict({k[len(prefix):]: v for k, v in values.items()})
        made.append(decoder)
        return decoder
    return seeded


def official_end_to_end(checkout: Path) -> dict:
    """train.train on 4 fixed 64-px images (its test split, one batch, labels 0/1 alternating) with its
    training meta-epoch skipped: seeded reflection-padded resnet18 encoder, seeded 8-block decoders
    (condition 8). Returns the e2e_cflow.npz arrays."""
    model, train = _import(checkout, "model"), _import(checkout, "train")
    patched = ("load_encoder_arch", "load_decoder_arch", "MVTecDataset", "train_meta_epoch", "save_weights",
               "save_results", "test_meta_epoch", "roc_auc_score")
    saved = (model.resnet18, {name: getattr(train, name) for name in patched})
    try:
        return {**_end_to_end_run(model, train), **_official_preprocessing(checkout)}
    finally:  # the stage fixtures patch the same functions afterwards
        model.resnet18 = saved[0]
        for name, value in saved[1].items():
            setattr(train, name, value)


def _end_to_end_run(model, train) -> dict:
    original = model.resnet18
    model.resnet18 = lambda pretrained, progress: original(pretrained=False)

    def encoder_arch(c, L):
        encoder, pool_layers, pool_dims = model.load_encoder_arch(c, L)
        encoder.load_state_dict(seeded_state(encoder))
        return encoder, pool_layers, pool_dims

    train.load_encoder_arch = encoder_arch
    train.load_decoder_arch = _seeded_decoders(model.load_decoder_arch)
    images = to_tensor(parity_images(4, E2E_SIZE, seed=11))
    train.MVTecDataset = lambda c, is_train: _Fixed(images, [0, 1, 0, 1])
    train.train_meta_epoch = lambda *args: None
    train.save_weights = train.save_results = lambda *args, **kwargs: None
    state = {"roc": []}
    original_test_epoch = train.test_meta_epoch

    def test_epoch(*args):
        result = original_test_epoch(*args)
        state["test_dist"], state["sides"] = result[3], result[0]
        return result

    train.test_meta_epoch = test_epoch
    train.roc_auc_score = lambda truth, scores: state["roc"].append(np.asarray(scores)) or 0.5
    c = _options(condition_vec=CONDITION, meta_epochs=1, dataset="mvtec", action_type="norm-train", checkpoint="",
                 batch_size=4, workers=0, use_cuda=False, device=torch.device("cpu"), crp_size=(E2E_SIZE, E2E_SIZE),
                 model="seeded", class_name="seeded", verbose=False, hide_tqdm_bar=True, pro=False, viz=False)
    train.train(c)
    log_probs = [torch.tensor(level, dtype=torch.float64) for level in state["test_dist"]]
    # The largest value of its summed probability map (train.train's score_map.max(), a local): recomputed
    # from its log-likelihoods in float64 as it does, so the test can place our fitted-maximum shift.
    total = sum(torch.nn.functional.interpolate(torch.exp(p - p.max()).reshape(4, 1, side, side), size=c.crp_size,
                                                mode="bilinear", align_corners=True)
                for p, side in zip(log_probs, state["sides"]))
    layouts = [{k: list(v.shape) for k, v in model.freia_cflow_head(c, dim).state_dict().items()} for dim in (128, 256, 512)]
    return {**{f"log_prob{level}": p.numpy().astype(np.float32) for level, p in enumerate(log_probs)},
            "scores": state["roc"][0], "maps": state["roc"][1].reshape(4, E2E_SIZE, E2E_SIZE).astype(np.float32),
            "total_max": total.max().numpy(), "decoder_layout": np.array(json.dumps(layouts))}


def _official_preprocessing(checkout: Path) -> dict:
    """custom_datasets' MVTecDataset, test split (its training split adds the ±5° rotation), at main.py's
    defaults (input 256: Resize (256, 256) with ANTIALIAS, which Pillow >= 10 names LANCZOS, CentreCrop 256,
    ImageNet normalisation) on the fixed PNG files."""
    import tempfile

    import PIL.Image
    import torchvision.io

    from make_fixtures import _import as import_file
    from preprocessing_fixtures import COUNT, coarse_summary, mvtec_pngs

    PIL.Image.ANTIALIAS = PIL.Image.LANCZOS
    if not hasattr(torchvision.io, "read_video"):  # imported for its video dataset only, gone from torchvision
        torchvision.io.read_video = None
    loader = import_file(checkout / "custom_datasets" / "loader.py", "cflow_official_loader")
    with tempfile.TemporaryDirectory() as tmp:
        c = types.SimpleNamespace(data_path=str(mvtec_pngs(Path(tmp), "test")), class_name="bottle", img_size=(256, 256),
                                  crp_size=(256, 256), norm_mean=[0.485, 0.456, 0.406], norm_std=[0.229, 0.224, 0.225])
        dataset = loader.MVTecDataset(c, is_train=False)
        return coarse_summary([dataset[i][0] for i in range(COUNT)])


class _Fixed(torch.utils.data.Dataset):
    """The test split: fixed images (as the official transform gives them: no resize at 64 px), labels, empty masks."""

    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], torch.zeros(1, E2E_SIZE, E2E_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cflow", type=Path, required=True, help=f"checkout of {OFFICIAL[0]} at {OFFICIAL[1][:10]}")
    parser.add_argument("--freia", type=Path, help="FrEIA checkout (default: the installed package)")
    parser.add_argument("--only", choices=("stages", "end_to_end"), help="one fixture (default: both)")
    args = parser.parse_args()
    if args.freia is not None:
        sys.path.insert(0, str(args.freia.resolve()))
    checkout = args.cflow.resolve()
    # Its dataset module imports torchvision's video reader, gone from recent torchvision; stubbed below anyway.
    sys.modules.setdefault("custom_datasets", types.SimpleNamespace(__all__=["MVTecDataset", "StcDataset"],
                                                                    MVTecDataset=None, StcDataset=None))
    if args.only != "stages":  # first: the stages below leave train's functions patched
        torch.manual_seed(0)
        _write(OUT.with_name("e2e_cflow.npz"), "train.train with train_meta_epoch skipped (load_encoder_arch resnet18 "
               "seeded, load_decoder_arch freia-cflow seeded, test_meta_epoch, its test-set normalisation, upsampling, "
               "super_mask and score_label)", official_end_to_end(checkout))
    if args.only == "end_to_end":
        return
    arrays: dict = {}
    for stage in (encoding_and_encoder, flow_and_loss, learning_rates, official_train):
        torch.manual_seed(0)
        stage(checkout, arrays)
    _write(OUT, "model.positionalencoding2d, load_encoder_arch, freia_cflow_head; utils.get_logp; "
                "custom_models.utils.adjust_learning_rate / warmup_learning_rate; train.train", arrays)


def _write(path: Path, functions: str, arrays: dict) -> None:
    source = json.dumps({"repository": OFFICIAL[0], "commit": OFFICIAL[1], "flow": FREIA[0], "functions": functions})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, source=np.array(source), **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")

if __name__ == "__main__":
    main()
