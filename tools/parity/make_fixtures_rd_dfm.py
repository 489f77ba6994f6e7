"""Regenerates tests/fixtures/parity/reverse_distillation.npz and dfm.npz from the reference code.

Reverse Distillation: hq-deng/RD4AD's own modules (``resnet.resnet18`` encoder and ``BN_layer``,
``de_resnet.de_resnet18``) with the seeded weights of tests/parity_inputs.py (drawn per official tensor
name), on the fixed images of ``parity_images``; its ``main.loss_fucntion`` and ``test.cal_anomaly_map`` +
``scipy.ndimage.gaussian_filter(σ 4)`` as ``test.evaluation`` calls them. Run in a virtualenv with the
checkout's dependencies (torch, torchvision, scipy):
    python tools/parity/make_fixtures_rd_dfm.py --rd4ad DIR --only reverse_distillation
DFM: anomalib 2.7.0's ``DFMModel`` (its feature extractor replaced by fixed feature maps), ``PCA`` and
``SingleClassGaussian``; run with anomalib installed:
    python tools/parity/make_fixtures_rd_dfm.py --only dfm
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools" / "parity")]
from make_fixtures import OUT, _import  # noqa: E402
from parity_inputs import parity_images, seeded_state, to_tensor  # noqa: E402

SOURCES = {
    "reverse_distillation": ("hq-deng/RD4AD", "6554076872c65f8784f6ece8cfb39ce77e1aee12"),
    "dfm": ("open-edge-platform/anomalib (PyPI anomalib)", "2.7.0"),
}
RD_SIZE = 32  # images [2, 3, 32, 32]: levels 8², 4², 2², code 1²


def _save(name: str, functions: str, prefix: str = "", **arrays) -> None:
    """``<prefix><name>.npz`` with its ``source`` (``prefix="e2e_"`` for the end-to-end fixtures)."""
    repo, commit = SOURCES[name]
    source = json.dumps({"repository": repo, "commit": commit, "functions": functions})
    path = OUT / f"{prefix}{name}.npz"
    np.savez_compressed(path, source=np.array(source), **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")


def _shapes(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    return json.dumps({k: list(v.shape) for k, v in module.state_dict().items() if not k.startswith(skip)})


def _bottleneck_blocks(resnet, de_resnet) -> dict[str, np.ndarray]:
    """The wide ResNets' blocks at small widths (the R18 run has basic blocks only): the OCBE's first
    ``AttnBottleneck`` (stride 2, 1×1 downsample) and a decoder ``Bottleneck`` (stride 2, 2×2 deconvolution),
    width per group 128 as in WR50, seeded weights, eval mode."""
    generator = torch.Generator().manual_seed(7)
    down = resnet.AttnBottleneck(48, 8, 2, torch.nn.Sequential(resnet.conv1x1(48, 32, 2), torch.nn.BatchNorm2d(32)),
                                 base_width=128)
    up = de_resnet.Bottleneck(64, 8, 2, torch.nn.Sequential(de_resnet.deconv2x2(64, 32, 2), torch.nn.BatchNorm2d(32)),
                              base_width=128)
    arrays = {"ocbe_block_in": torch.randn(2, 48, 8, 8, generator=generator),
              "decoder_block_in": torch.randn(2, 64, 4, 4, generator=generator)}
    with torch.no_grad():
        for name, block in (("ocbe_block", down), ("decoder_block", up)):
            block.load_state_dict(seeded_state(block))
            arrays[f"{name}_out"] = block.eval()(arrays[f"{name}_in"].clone())
    return {key: value.numpy() for key, value in arrays.items()}


def reverse_distillation(checkout: Path) -> None:
    from scipy.ndimage import gaussian_filter

    resnet = _import(checkout / "resnet.py", "rd_resnet")
    de_resnet = _import(checkout / "de_resnet.py", "rd_de_resnet")
    main = _import(checkout / "main.py", "rd_main")
    test = sys.modules["test"]  # main.py imports the checkout's test.py
    encoder, bottleneck = resnet.resnet18(pretrained=False)
    decoder = de_resnet.de_resnet18(pretrained=False)
    for module in (encoder, bottleneck, decoder):
        module.load_state_dict(seeded_state(module))
        module.eval()
    images = to_tensor(parity_images(2, RD_SIZE)).contiguous()  # as ToTensor gives them
    with torch.no_grad():
        features = encoder(images)
        code = bottleneck(features)
        outputs = decoder(code)
        loss_eval = main.loss_fucntion(features, outputs)
        maps = []
        for index in range(len(images)):  # test.evaluation runs batch 1
            one = test.cal_anomaly_map([f[index:index + 1] for f in features],
                                       [o[index:index + 1] for o in outputs], RD_SIZE, amap_mode="a")[0]
            maps.append(gaussian_filter(one, sigma=4))
        bottleneck.train()
        decoder.train()  # main.train's mode: batch statistics in the OCBE and the decoder
        loss_train = main.loss_fucntion(features, decoder(bottleneck(features)))
    arrays = _bottleneck_blocks(resnet, de_resnet)
    wide_encoder, wide_bottleneck = resnet.wide_resnet50_2(pretrained=False)
    arrays.update({f"encoder_layer{i + 1}": f.numpy() for i, f in enumerate(features)})
    arrays.update({f"decoder_layer{i + 1}": o.numpy() for i, o in enumerate(outputs)})
    _save("reverse_distillation",
          "resnet.resnet18 / BN_layer(AttnBasicBlock, 2), de_resnet.de_resnet18, main.loss_fucntion, "
          "test.cal_anomaly_map(amap_mode='a') + scipy gaussian_filter(sigma=4) and max (test.evaluation); "
          "weights: tests/parity_inputs.seeded_state per official name; state-dict shapes of the R18 and WR50 pairs; "
          "resnet.AttnBottleneck and de_resnet.Bottleneck at small widths (width per group 128)",
          **arrays, code=code.numpy(), loss_eval=np.float64(loss_eval), loss_train=np.float64(loss_train),
          maps=np.stack(maps).astype(np.float32), scores=np.array([m.max() for m in maps]),
          shapes_r18=np.array(_shapes(bottleneck, ("conv4", "bn4")) + "\n" + _shapes(decoder)),
          shapes_wr50=np.array(_shapes(wide_bottleneck, ("conv4", "bn4")) + "\n"
                               + _shapes(de_resnet.de_wide_resnet50_2(pretrained=False))))
    del wide_encoder


class _FixedLayer(torch.nn.Module):
    """Stands in for anomalib's feature extractor: ``layer3`` is the given feature maps."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"layer3": self.features}


def _dfm_defaults() -> str:
    """anomalib's ``Dfm`` constructor defaults and its default input size (``configure_pre_processor``)."""
    import inspect

    from anomalib.models import Dfm

    parameters = inspect.signature(Dfm.__init__).parameters
    defaults = {name: parameters[name].default for name in ("backbone", "layer", "pre_trained",
                                                            "pooling_kernel_size", "pca_level", "score_type")}
    resize = Dfm.configure_pre_processor().transform.transforms[0]
    return json.dumps({**defaults, "image_size": list(resize.size)})


def dfm(_: Path | None) -> None:
    from anomalib.models.components import PCA
    from anomalib.models.image.dfm.torch_model import DFMModel, SingleClassGaussian

    # SingleClassGaussian.fit calls torch.mean(..., device=...), which torch >= 2.1 refuses; the shim drops
    # that keyword (the tensor is already on its device) so the reference runs unchanged otherwise.
    mean = torch.mean
    torch.mean = lambda *args, device=None, **kwargs: mean(*args, **kwargs)  # noqa: E731

    generator = torch.Generator().manual_seed(25)
    train = torch.randn(12, 16, 8, 8, generator=generator).half().float()
    test = (torch.randn(4, 16, 8, 8, generator=generator) * 1.5).half().float()
    arrays = {"train_features": train.numpy(), "test_features": test.numpy()}
    images = torch.zeros(4, 3, 32, 32)
    for score_type in ("fre", "nll"):
        model = DFMModel("resnet18", "layer3", pre_trained=False, pooling_kernel_size=4, n_comps=0.97,
                         score_type=score_type)
        model.feature_extractor = _FixedLayer(train)
        pooled, _ = model.get_features(images)
        model.memory_bank = [pooled.clone()]
        model.fit()
        model.eval()
        model.feature_extractor = _FixedLayer(test)
        prediction = model(images)
        arrays[f"{score_type}_model_scores"] = prediction.pred_score.numpy()
        if score_type == "fre":
            arrays.update(train_pooled=pooled.numpy(), pca_mean=model.pca_model.mean.numpy(),
                          pca_components=model.pca_model.singular_vectors.numpy(),
                          fre_scores=prediction.pred_score.numpy(), fre_maps=prediction.anomaly_map.numpy())
    # The Gaussian of the paper on once-centred coefficients (anomalib's DFMModel.fit centres its bank twice:
    # PCA.fit subtracts the mean in place, then PCA.transform again; its nll_model_scores keep that).
    pca = PCA(n_components=0.97)
    pca.fit(torch.from_numpy(arrays["train_pooled"]).clone())
    gaussian = SingleClassGaussian()
    gaussian.fit(pca.transform(torch.from_numpy(arrays["train_pooled"]).clone()).T)
    test_pooled = torch.nn.functional.avg_pool2d(test, 4).flatten(1)
    arrays["nll_scores"] = gaussian.score_samples(pca.transform(test_pooled.clone())).numpy()
    arrays["defaults"] = np.array(_dfm_defaults())
    _save("dfm", "DFMModel(pooling_kernel_size=4, n_comps=0.97, score_type fre / nll).get_features / fit / forward "
          "with fixed layer3 features; PCA.fit / transform and SingleClassGaussian.fit / score_samples (nll_scores)",
          **arrays)


def reverse_distillation_end_to_end(checkout: Path) -> None:
    """test.evaluation's path on 4 fixed 32-px images (resnet18 pair, seeded weights): encoder, bn, decoder,
    cal_anomaly_map(amap_mode='a'), gaussian_filter(σ 4), max."""
    from scipy.ndimage import gaussian_filter

    resnet = _import(checkout / "resnet.py", "rd_resnet")
    de_resnet = _import(checkout / "de_resnet.py", "rd_de_resnet")
    _import(checkout / "main.py", "rd_main")
    test = sys.modules["test"]
    encoder, bottleneck = resnet.resnet18(pretrained=False)
    decoder = de_resnet.de_resnet18(pretrained=False)
    for module in (encoder, bottleneck, decoder):
        module.load_state_dict(seeded_state(module))
        module.eval()
    maps = []
    with torch.no_grad():
        for image in to_tensor(parity_images(4, RD_SIZE, seed=2)).contiguous():
            inputs = encoder(image[None])
            one = test.cal_anomaly_map(inputs, decoder(bottleneck(inputs)), RD_SIZE, amap_mode="a")[0]
            maps.append(gaussian_filter(one, sigma=4))
    maps = np.stack(maps).astype(np.float32)
    _save("reverse_distillation", prefix="e2e_",
          functions="test.evaluation's scoring: encoder, bn, decoder, cal_anomaly_map(amap_mode='a'), "
              "gaussian_filter(sigma=4), np.max; resnet18 / BN_layer / de_resnet18 with seeded weights",
              maps=maps, scores=maps.reshape(4, -1).max(1))


def dfm_end_to_end(_: Path | None) -> None:
    """anomalib's DFMModel (resnet18 layer2, seeded weights, pooling 4, 0.97, fre) fitted on 24 fixed 64-px
    images in training mode, then scoring 4 others: pred_score and anomaly_map."""
    from anomalib.models.image.dfm.torch_model import DFMModel

    model = DFMModel("resnet18", "layer2", pre_trained=False, pooling_kernel_size=4, n_comps=0.97, score_type="fre")
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict(seeded_state(extractor))
    model.train()
    with torch.no_grad():
        model(to_tensor(parity_images(24, 64, seed=1)).contiguous())
        model.fit()
        model.eval()
        prediction = model(to_tensor(parity_images(4, 64, seed=2)).contiguous())
    _save("dfm", prefix="e2e_",
          functions="DFMModel('resnet18', 'layer2', pooling 4, n_comps 0.97, fre): forward in training mode "
              "(memory bank), fit, forward in eval mode (pred_score, anomaly_map); seeded timm resnet18 weights",
              maps=prediction.anomaly_map[:, 0].numpy(), scores=prediction.pred_score.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rd4ad", type=Path,
                        help=f"checkout of hq-deng/RD4AD at {SOURCES['reverse_distillation'][1][:10]}")
    parser.add_argument("--only", default="reverse_distillation,dfm")
    args = parser.parse_args()
    for name in args.only.split(","):
        torch.manual_seed(0)
        if name == "reverse_distillation":
            reverse_distillation(args.rd4ad.resolve())
            reverse_distillation_end_to_end(args.rd4ad.resolve())
        else:
            dfm(None)
            dfm_end_to_end(None)


if __name__ == "__main__":
    main()
