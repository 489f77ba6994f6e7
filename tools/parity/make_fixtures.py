"""Regenerates tests/fixtures/parity/*.npz by running the official code on small fixed inputs.

Each official repository is imported from a checkout given on the command line (check out the pinned
commit in ``OFFICIAL``); its functions run unchanged on seeded inputs, with stub backbones that return
fixed feature maps and stub data loaders, so that every stage's numbers are the official code's.
Every fixture stores its inputs, the official outputs, and ``source`` (repository, commit, function).

Run it in a separate virtualenv (official dependencies: faiss-cpu, scikit-image, opencv, FrEIA...):
    python tools/parity/make_fixtures.py --padim DIR --patchcore DIR --stfpm DIR --mvtec-eval DIR \
        --fastflow DIR --freia DIR --draem DIR [--only padim,...]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "parity"
OFFICIAL = {
    "padim": ("xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master", "616004b9b7fa6a507d196dd3eeeba9e0a93f160f"),
    "patchcore": ("amazon-science/patchcore-inspection", "fcaa92f124fb1ad74a7acf56726decd4b27cbcad"),
    "stfpm": ("gdwang08/STFPM", "2598a5e35fd02f2f9dcfd0f3e8249adc22320e59"),
    # The MVTec (3D-)AD evaluation code's pro_curve_util.py / generic_util.py, as redistributed in this
    # repository (MVTec distributes it only as a download from mvtec.com).
    "mvtec-eval": ("Simoary/vqgan-ledgm-segAD", "cd960d7cfaa3ebb180fb01e2fb917bb05a0dbe1f"),
    "fastflow": ("gathierry/FastFlow", "2cf1f2f4c562a7f13cfb1959e3afe5df2f2d2565"),
    "freia": ("vislearn/FrEIA (VLL-HD/FrEIA)", "1779d1fba1e21000fda1927b59eeac0a6fcaa284"),
    "draem": ("VitjanZ/DRAEM", "2dbf67397ab5c10a1494e5ae70ab59a25d7c35ef"),
    "pytorch-msssim": ("VainF/pytorch-msssim (PyPI pytorch-msssim)", "1.0.0"),
    "lpips": ("richzhang/PerceptualSimilarity (PyPI lpips)", "0.1.4"),
}


def _import(path: Path, name: str):
    """Imports one file of a checkout as a module, with its directory first on sys.path."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _save(name: str, key: str, functions: str, **arrays) -> None:
    repo, commit = OFFICIAL[key]
    source = json.dumps({"repository": repo, "commit": commit, "functions": functions})
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / f"{name}.npz", source=np.array(source), **arrays)
    print(f"{name}.npz: {(OUT / f'{name}.npz').stat().st_size / 1024:.0f} KB")


def _half(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Random features rounded to float16, so the stored fixture input is exact and half the size."""
    return torch.randn(*shape, generator=generator).half().float()


class _IndexedStub(nn.Module):
    """A backbone whose named layers return stored feature maps: image k (its pixel [0, 0, 0] = k) gets
    row k of each stored tensor; the layers are Sequentials so the official forward hooks attach."""

    def __init__(self, names: list[str], features: list[torch.Tensor]) -> None:
        super().__init__()
        self.names, self.features = names, features
        for name in names:
            setattr(self, name, nn.Sequential(nn.Identity()))

    def forward(self, images: torch.Tensor):
        rows = images[:, 0, 0, 0].long().clamp(0, len(self.features[0]) - 1)
        return [getattr(self, name)(feature[rows]) for name, feature in zip(self.names, self.features)]


def _indexed_images(count: int, size: int, offset: int = 0) -> torch.Tensor:
    images = torch.zeros(count, 3, size, size)
    images[:, 0, 0, 0] = torch.arange(offset, offset + count, dtype=torch.float32)
    return images


# -- PaDiM ----------------------------------------------------------------------------------------------
def padim(checkout: Path) -> None:
    """main.main() with arch resnet18 (448 channels, its own random.seed(1024) draw of 100), stub backbone,
    a 16-pixel input (layer grids 4, 2, 1), 16 training and 4 test images."""
    main = _import(checkout / "main.py", "padim_official_main")
    g = torch.Generator().manual_seed(0)
    n_train, n_test, size = 16, 4, 16
    shapes = [(64, 4), (128, 2), (256, 1)]
    train = [_half(g, n_train, c, s, s) for c, s in shapes]
    test = [_half(g, n_test, c, s, s) for c, s in shapes]
    test[0][1] += 3.0  # one clearly anomalous test image
    test = [t.half().float() for t in test]  # exactly what the fixture stores

    class Stub(_IndexedStub):
        def forward(self, images):  # training images are 0..15, test images 100..103
            index = images[:, 0, 0, 0].long()
            bank = train if index.min() < 100 else test
            rows = index % 100
            for name, feature in zip(("layer1", "layer2", "layer3"), bank):
                getattr(self, name)(feature[rows])

    stub = Stub(["layer1", "layer2", "layer3"], train)
    labels = torch.tensor([0, 1, 0, 1])
    masks = torch.zeros(n_test, 1, size, size)
    masks[1, :, 2:9, 3:12] = 1
    masks[3, :, 10:14, 10:14] = 1
    train_set = [(img, 0, torch.zeros(1, size, size)) for img in _indexed_images(n_train, size)]
    test_set = [(img, int(y), m) for img, y, m in zip(_indexed_images(n_test, size, 100), labels, masks)]
    main.mvtec.CLASS_NAMES = ["stub"]
    main.mvtec.MVTecDataset = lambda root, class_name, is_train: train_set if is_train else test_set
    main.resnet18 = lambda pretrained, progress: stub
    records: dict[str, list] = {"upsampled": [], "smoothed": [], "distance": []}
    real_filter, real_f = main.gaussian_filter, main.F

    def recording_filter(array, sigma):
        records["upsampled"].append(array.copy())
        records["smoothed"].append(real_filter(array, sigma=sigma))
        return records["smoothed"][-1]

    class RecordingF(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(real_f, name)

        @staticmethod
        def interpolate(tensor, **kwargs):
            if kwargs.get("mode") == "bilinear":
                records["distance"].append(tensor.numpy().copy())
            return real_f.interpolate(tensor, **kwargs)

    main.gaussian_filter, main.F = recording_filter, RecordingF()
    main.plot_fig = lambda test_img, scores, *rest: records.__setitem__("scores", scores.copy())
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["main.py", "--data_path", tmp, "--save_path", tmp, "--arch", "resnet18"]
        main.main()
        import pickle

        with open(Path(tmp) / "temp_resnet18" / "train_stub.pkl", "rb") as handle:
            mean, cov = pickle.load(handle)
    import random

    random.seed(1024)
    idx = np.array(random.sample(range(0, 448), 100))
    embedding = torch.cat([train[0], *(main.F.interpolate(t, size=4, mode="nearest") for t in train[1:])], 1)
    official_embedding = main.embedding_concat(main.embedding_concat(train[0], train[1]), train[2])
    assert torch.equal(official_embedding, embedding)  # the harness feeds what the official code saw
    cov_diag = np.stack([np.diag(cov[:, :, i]) for i in range(cov.shape[2])], 1)
    _save(
        "padim", "padim",
        "main.main (resnet18 branch: random.sample channel draw, embedding_concat, np.cov + 0.01*I, "
        "scipy mahalanobis, F.interpolate bilinear, gaussian_filter sigma=4, min-max scores); embedding_concat",
        **{f"train_layer{i + 1}": t.half().numpy() for i, t in enumerate(train)},
        **{f"test_layer{i + 1}": t.half().numpy() for i, t in enumerate(test)},
        feature_index=idx, embedding_image0=official_embedding[0].index_select(0, torch.tensor(idx)).numpy(),
        mean=mean, cov_diag=cov_diag, cov_position5=cov[:, :, 5], distance=records["distance"][0][:, 0],
        upsampled=np.stack(records["upsampled"]), smoothed=np.stack(records["smoothed"]),
        scores=records["scores"], labels=labels.numpy(), size=np.array(size),
    )


# -- PatchCore ------------------------------------------------------------------------------------------
def patchcore(checkout: Path) -> None:
    """PatchCore.load/_embed/fit/_predict (IdentitySampler, FaissNN, 1 neighbour), layer2+layer3 of a stub
    with resnet18's channels at a 32-pixel input, pretrain/target dimension 1024; and the approximate
    greedy coreset sampler on its own small features with a recorded projection and start points."""
    sys.path.insert(0, str(checkout / "src"))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    g = torch.Generator().manual_seed(1)
    n_train, n_test, size = 4, 2, 32
    shapes = [(128, 4), (256, 2)]
    train = [_half(g, n_train, c, s, s) for c, s in shapes]
    test = [_half(g, n_test, c, s, s) for c, s in shapes]
    test[0][1, :, 1:3, 1:3] += 2.0
    test = [t.half().float() for t in test]  # exactly what the fixture stores
    features = [torch.cat([a, b]) for a, b in zip(train, test)]
    stub = _IndexedStub(["layer2", "layer3"], features)
    model = patchcore.patchcore.PatchCore(torch.device("cpu"))
    model.load(stub, ["layer2", "layer3"], torch.device("cpu"), (3, size, size), 1024, 1024, patchsize=3,
               featuresampler=patchcore.sampler.IdentitySampler(), nn_method=patchcore.common.FaissNN(False, 1))
    train_images, test_images = _indexed_images(n_train, size), _indexed_images(n_test, size, n_train)
    embedding = np.asarray(model._embed(test_images[:1]))
    model.fit([train_images])
    image_scores, maps = model._predict(test_images)
    nn_scores = model.anomaly_scorer.predict([np.asarray(model._embed(test_images))])[0]

    # Coreset: the sampler's own projection (an nn.Linear drawn under torch seed 3) and start points
    # (np.random.choice under numpy seed 4), recorded by drawing them again under the same seeds.
    bank = _half(torch.Generator().manual_seed(2), 300, 64)
    sampler = patchcore.sampler.ApproximateGreedyCoresetSampler(0.1, torch.device("cpu"), 10, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        projected = sampler._reduce_features(bank)
    torch.manual_seed(3)
    weight = nn.Linear(64, 16, bias=False).weight.detach()
    assert torch.equal(projected, bank @ weight.T)
    np.random.seed(4)
    indices = sampler._compute_greedy_coreset_indices(projected)
    np.random.seed(4)
    starts = np.random.choice(len(bank), 10, replace=False)
    _save(
        "patchcore", "patchcore",
        "patchcore.patchcore.PatchCore.load/_embed/fit/_predict (PatchMaker, Preprocessing/MeanMapper, "
        "Aggregator, NearestNeighbourScorer+FaissNN, RescaleSegmentor); "
        "patchcore.sampler.ApproximateGreedyCoresetSampler._reduce_features/_compute_greedy_coreset_indices",
        **{f"train_layer{i + 2}": t.half().numpy() for i, t in enumerate(train)},
        **{f"test_layer{i + 2}": t.half().numpy() for i, t in enumerate(test)},
        embedding_test0=embedding, nn_squared_distances=nn_scores.reshape(n_test, 4, 4),
        image_scores=np.asarray(image_scores), maps=np.stack(maps), size=np.array(size),
        coreset_features=bank.half().numpy(), coreset_projection=weight.numpy(), coreset_starts=starts,
        coreset_indices=indices,
    )


# -- STFPM ----------------------------------------------------------------------------------------------
def stfpm(checkout: Path) -> None:
    """main.test (per-level normalised distance, 64×64 bilinear, product) and main.train_val's loss (the
    value passed to backward), on fixed teacher/student features of a 256-pixel input; the final map is
    main()'s cv2.resize to 256×256, kept on a subsampled grid."""
    main = _import(checkout / "main.py", "stfpm_official_main")
    import cv2

    g = torch.Generator().manual_seed(5)
    shapes = [(2, 64), (3, 32), (4, 16)]
    teacher = [_half(g, 2, c, s, s) for c, s in shapes]
    student = [t + 0.7 * _half(g, *t.shape) for t in teacher]
    student[1][1, :, 10:20, 5:9] += 2.0
    student = [s.half().float() for s in student]  # exactly what the fixture stores

    class Net(_IndexedStub):
        def __init__(self, features):
            super().__init__(["l1", "l2", "l3"], features)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, images):
            return [f * self.scale for f in super().forward(images)]

    teacher_net, student_net = Net(teacher), Net(student)
    images = _indexed_images(2, 8)
    loader = torch.utils.data.DataLoader([("x", img) for img in images], batch_size=2, shuffle=False)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    losses = []
    real_backward = torch.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        losses.append(self.item())
        return real_backward(self, *args, **kwargs)

    torch.Tensor.backward = recording_backward
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        main.train_val(teacher_net, student_net, loader, loader,
                       types.SimpleNamespace(epochs=1, model_save_path=tmp, category="stub"))
    torch.Tensor.backward = real_backward
    student_net.scale.data.fill_(1.0)  # undo train_val's one optimiser step for the map
    maps64 = main.test(teacher_net, student_net, loader)
    final = np.stack([cv2.resize(m, (256, 256)) for m in maps64])
    grid = np.r_[0:256:5, 255]
    _save(
        "stfpm", "stfpm", "main.train_val (loss before backward), main.test (anomaly map), main.main's cv2.resize to 256",
        **{f"teacher_layer{i + 1}": t.half().numpy() for i, t in enumerate(teacher)},
        **{f"student_layer{i + 1}": s.half().numpy() for i, s in enumerate(student)},
        loss=np.array(losses[0]), map64=maps64.astype(np.float32), final_grid=grid,
        final_on_grid=final[:, grid][:, :, grid].astype(np.float32),
    )


# -- metrics --------------------------------------------------------------------------------------------
def mvtec_eval(checkout: Path) -> None:
    """pro_curve_util.compute_pro + generic_util.trapezoid(x_max) / x_max (evaluate_experiment's AU-PRO)."""
    pro_util = _import(checkout / "pro_curve_util.py", "pro_curve_util")
    generic = _import(checkout / "generic_util.py", "generic_util")
    rng = np.random.default_rng(6)
    masks = np.zeros((6, 40, 40), dtype=np.uint8)
    masks[0, 5:15, 5:15] = 1
    masks[0, 25:28, 30:38] = 1  # two regions of different size in one image
    masks[1, 10:30, 12:20] = 1
    masks[2, 0:4, 0:40] = 1
    masks[2, 30:33, 3:6] = 1
    masks[2, 33:36, 6:9] = 1  # diagonal contact: one 8-connected region
    maps = rng.random(masks.shape) + 0.8 * masks * rng.random(masks.shape)
    maps = gaussian_like(maps)
    quantised = np.round(maps * 8) / 8  # heavy ties
    results = {}
    for name, scores in (("maps", maps), ("quantised", quantised)):
        with contextlib.redirect_stdout(sys.stderr):
            fprs, pros = pro_util.compute_pro(anomaly_maps=list(scores), ground_truth_maps=list(masks))
        for limit in (0.3, 0.05, 1.0):
            results[f"{name}_aupro_{limit}"] = generic.trapezoid(fprs, pros, x_max=limit) / limit
    _save("aupro", "mvtec-eval", "pro_curve_util.compute_pro, generic_util.trapezoid(x_max) / x_max",
          masks=masks, maps=maps.astype(np.float32), quantised=quantised.astype(np.float32),
          **{k: np.array(v) for k, v in results.items()})


# -- FastFlow -------------------------------------------------------------------------------------------
def fastflow(checkout: Path, freia: Path) -> None:
    """FrEIA's AllInOneBlock (the pinned commit, as fastflow.nf_fast_flow configures it: clamp 2, hard
    permutation) on random weights; and fastflow.FastFlow.forward's loss and eval-mode map on a stub
    backbone (channels 4, 6, 8 at reductions 4, 8, 16 of a 32-pixel input, 2 flow steps)."""
    sys.path.insert(0, str(freia))
    sys.path.insert(0, str(checkout))
    import FrEIA.framework as Ff
    import fastflow as official

    g = torch.Generator().manual_seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    chain = official.nf_fast_flow([7, 5, 5], conv3x3_only=True, hidden_ratio=1.0, flow_steps=1)
    block = chain.module_list[0]
    with torch.no_grad():
        for parameter in block.subnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.5)
        block.global_scale.add_(torch.randn(block.global_scale.shape, generator=g))
        block.global_offset.copy_(torch.randn(block.global_offset.shape, generator=g) * 0.3)
    x = _half(g, 2, 7, 5, 5)
    with torch.no_grad():
        y, log_det = chain(x)
    permutation = block.w_perm.detach()[:, :, 0, 0].argmax(1)

    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.feature_info = types.SimpleNamespace(channels=lambda: [4, 6, 8], reduction=lambda: [4, 8, 16])
            self.features = [_half(g, 3, c, s, s) for c, s in ((4, 8), (6, 4), (8, 2))]

        def forward(self, images):
            return self.features

    stub = Stub()
    official.timm.create_model = lambda *args, **kwargs: stub
    torch.manual_seed(10)
    model = official.FastFlow("resnet18", flow_steps=2, input_size=32, conv3x3_only=False, hidden_ratio=1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=g) * 0.1)
    model.eval()
    with torch.no_grad():
        result = model(torch.zeros(3, 3, 32, 32))
        latents, log_dets = zip(*(flow(norm(f)) for flow, norm, f in zip(model.nf_flows, model.norms, stub.features)))
    _save(
        "fastflow", "fastflow",
        "FrEIA.modules.AllInOneBlock via fastflow.nf_fast_flow (FrEIA at "
        f"{OFFICIAL['freia'][1]}); fastflow.FastFlow.forward (loss, eval anomaly_map)",
        block_x=x.half().numpy(), block_y=y.numpy(), block_log_det=log_det.numpy(),
        block_permutation=permutation.numpy(), block_global_scale=block.global_scale.detach().numpy(),
        block_global_offset=block.global_offset.detach().numpy(),
        **{f"block_subnet_{k.replace('.', '_')}": v.detach().numpy() for k, v in block.subnet.state_dict().items()},
        **{f"z{i}": z.numpy() for i, z in enumerate(latents)},
        **{f"log_det{i}": d.numpy() for i, d in enumerate(log_dets)},
        loss=result["loss"].numpy(), anomaly_map=result["anomaly_map"].numpy(),
    )


# -- DRAEM ----------------------------------------------------------------------------------------------
def draem(checkout: Path) -> None:
    """loss.FocalLoss() on softmax probabilities, loss.SSIM() (1 − SSIM), and test_DRAEM.test's image
    score (captured from its roc_auc_score call) with stub networks returning fixed logits."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    loss = _import(checkout / "loss.py", "draem_official_loss")
    np.sctypes = {"float": [np.float16, np.float32, np.float64], "int": [np.int8, np.int16, np.int32, np.int64],
                  "uint": [np.uint8, np.uint16, np.uint32, np.uint64], "complex": [np.complex64, np.complex128],
                  "others": [bool, object, bytes, str, np.void]}  # imgaug 0.4 predates numpy 2
    tester = _import(checkout / "test_DRAEM.py", "draem_official_test")
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 2, 32, 32, generator=g) * 2
    masks = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()
    focal = loss.FocalLoss()(torch.softmax(logits, dim=1), masks)
    clean = torch.rand(2, 3, 32, 32, generator=g).half().float()
    reconstruction = (clean + 0.2 * torch.randn(clean.shape, generator=g)).clamp(0, 1).half().float()
    ssim_loss = loss.SSIM()(reconstruction, clean)

    low = torch.randn(4, 2, 16, 16, generator=g) * 3  # image-score logits, upsampled ×16 to 256
    low[1, 1, 3:5, 7:9] += 6.0

    class Stub(nn.Module):
        calls = 0

        def __init__(self, *args, seg=False, **kwargs):
            super().__init__()
            self.seg = seg

        def load_state_dict(self, *args, **kwargs):
            return None

        def forward(self, x):
            if not self.seg:
                return x
            index = Stub.calls
            Stub.calls += 1
            return low[index:index + 1].repeat_interleave(16, 2).repeat_interleave(16, 3)

    tester.torch.load = lambda *args, **kwargs: {}
    tester.ReconstructiveSubNetwork = lambda **kwargs: Stub()
    tester.DiscriminativeSubNetwork = lambda **kwargs: Stub(seg=True)
    tester.MVTecDRAEMTestDataset = lambda *args, **kwargs: [
        {"image": torch.zeros(3, 256, 256), "has_anomaly": np.array([float(i % 2)]), "mask": torch.zeros(1, 256, 256)}
        for i in range(4)]
    recorded = []
    real_auc = tester.roc_auc_score
    tester.roc_auc_score = lambda labels, scores: recorded.append(np.array(scores)) or real_auc(labels, scores)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        import os

        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            tester.test(["stub"], tmp + "/", tmp, "stub")
        finally:
            os.chdir(cwd)
    simulation = _draem_simulation_statistics(checkout)
    _save("draem", "draem", "loss.FocalLoss (softmax input, as train_DRAEM), loss.SSIM, test_DRAEM.test image score",
          focal_logits=logits.numpy(), focal_masks=masks.numpy(), focal=focal.numpy(),
          ssim_clean=clean.half().numpy(), ssim_reconstruction=reconstruction.half().numpy(), ssim_loss=ssim_loss.numpy(),
          score_logits_16=low.numpy(), image_scores=recorded[0].astype(np.float32), **simulation)


def _draem_simulation_statistics(checkout: Path, draws: int = 400, size: int = 64) -> dict[str, np.ndarray]:
    """data_loader.MVTecDRAEMTrainDataset.augment_image (Perlin mask incl. its imgaug rotation, blend) on a grey image and a random texture file, with
    its torch.rand draws recorded (β = 0.8·first draw; the second decides "no anomaly"): per draw the
    mask coverage, whether it is anomalous, and β."""
    import cv2

    loader = _import(checkout / "data_loader.py", "draem_official_data_loader")
    recorded = []
    real_torch = loader.torch

    class RecordingTorch(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(real_torch, name)

        @staticmethod
        def rand(*args, **kwargs):
            value = real_torch.rand(*args, **kwargs)
            recorded.append(float(value[0]))
            return value

    loader.torch = RecordingTorch()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dtd" / "a").mkdir(parents=True)
        texture_path = str(Path(tmp) / "dtd" / "a" / "t.jpg")
        cv2.imwrite(texture_path, np.random.default_rng(12).integers(0, 256, (size, size, 3), dtype=np.uint8))
        dataset = loader.MVTecDRAEMTrainDataset(tmp, str(Path(tmp) / "dtd"), resize_shape=[size, size])
        # The texture augmenters (imgaug 0.4 fails on current PIL in Autocontrast) change neither the mask
        # nor β: their choice is still drawn, then the texture passes unchanged.
        choose = dataset.randAugmenter
        dataset.randAugmenter = lambda: (choose(), lambda image: image)[1]
        torch.manual_seed(12)
        np.random.seed(12)
        image = np.full((size, size, 3), 0.5, dtype=np.float32)
        coverage, anomalous, betas = [], [], []
        for _ in range(draws):
            recorded.clear()
            _, mask, has_anomaly = dataset.augment_image(image, texture_path)
            coverage.append(float(mask.mean()))
            anomalous.append(float(has_anomaly[0]))
            betas.append(0.8 * recorded[-2])
    return {"simulation_coverage": np.array(coverage, np.float32), "simulation_anomalous": np.array(anomalous),
            "simulation_beta": np.array(betas, np.float32)}


def ssim_lpips(_: Path | None) -> None:
    """pytorch_msssim.ssim (valid-region mean per image) and lpips.LPIPS(net='alex') with the seeded random
    trunk of tests/test_parity.py and random positive heads, from the installed PyPI packages."""
    import lpips
    import pytorch_msssim

    sys.path.insert(0, str(ROOT))
    from tests.test_parity import seeded_alexnet_state

    g = torch.Generator().manual_seed(8)
    x = torch.rand(3, 3, 48, 40, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    x, y = x.half().float(), y.half().float()
    ssim = pytorch_msssim.ssim(x.double(), y.double(), data_range=1.0, size_average=False)
    trunk = seeded_alexnet_state()
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in
             enumerate((64, 192, 384, 256, 256))}
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    for index in range(1, model.net.N_slices + 1):
        for name, module in getattr(model.net, f"slice{index}")._modules.items():
            if isinstance(module, nn.Conv2d):
                module.weight.data.copy_(trunk[f"features.{name}.weight"])
                module.bias.data.copy_(trunk[f"features.{name}.bias"])
    model.load_state_dict(heads, strict=False)
    a, b = x[:, :, :40, :40] * 2 - 1, y[:, :, :40, :40] * 2 - 1
    distance = model(a, b)
    _save("ssim_lpips", "pytorch-msssim", "pytorch_msssim.ssim(size_average=False); lpips.LPIPS(net='alex').forward "
          "(package lpips 0.1.4, random trunk/heads as stored)",
          x=x.half().numpy(), y=y.half().numpy(), ssim=ssim.numpy(), lpips_heads=np.concatenate(
              [h.flatten().numpy() for h in heads.values()]), lpips=distance.detach().flatten().numpy())


def gaussian_like(maps: np.ndarray) -> np.ndarray:
    """Smooth random maps (spatially correlated scores, as real anomaly maps), stored as float32."""
    from scipy import ndimage

    return np.stack([ndimage.gaussian_filter(m, 1.5) for m in maps]).astype(np.float32)


STAGES = {"padim": padim, "patchcore": patchcore, "stfpm": stfpm, "mvtec-eval": mvtec_eval, "ssim-lpips": ssim_lpips,
          "fastflow": fastflow, "draem": draem}
PACKAGE_STAGES = {"ssim-lpips"}  # use installed PyPI packages, no checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in OFFICIAL:
        parser.add_argument(f"--{key}", type=Path, help=f"checkout of {OFFICIAL[key][0]} at {OFFICIAL[key][1][:10]}")
    parser.add_argument("--only", default=None, help="comma-separated stages (default: every given checkout)")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else list(STAGES)
    for key in wanted:
        checkout = None if key in PACKAGE_STAGES else getattr(args, key.replace("-", "_"))
        if checkout is None and key not in PACKAGE_STAGES:
            print(f"skipping {key}: no --{key} checkout given")
            continue
        torch.manual_seed(0)
        if key == "fastflow":
            if args.freia is None:
                parser.error("--fastflow needs --freia (FrEIA at the commit gathierry/FastFlow pins)")
            fastflow(checkout.resolve(), args.freia.resolve())
            continue
        STAGES[key](checkout.resolve() if checkout else None)


if __name__ == "__main__":
    main()
