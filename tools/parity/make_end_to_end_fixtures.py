"""Regenerates tests/fixtures/parity/e2e_*.npz: each model's whole official inference path, image tensor in,
anomaly map and image score out, on the fixed images and seeded weights of tests/parity_inputs.py.

The official code runs unchanged; only what it would download (ImageNet backbones) is replaced by the
same architecture with seeded random weights (``seeded_state``), and its datasets by lists of the fixed
images. Run it in a separate virtualenv holding the official dependencies (faiss-cpu, FrEIA, opencv...),
with the checkouts at the commits of ``make_fixtures.OFFICIAL``:

    OMP_NUM_THREADS=1 python tools/parity/make_end_to_end_fixtures.py --padim DIR --patchcore DIR \
        --stfpm DIR --fastflow DIR --draem DIR [--only padim,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tools" / "parity")]
from make_fixtures import OFFICIAL, _import  # noqa: E402
from parity_inputs import parity_images, seeded_state, seeded_tensors, to_tensor  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity"


def save(name: str, key: str, functions: str, **arrays) -> None:
    """One fixture with its ``source`` (repository, commit, functions); ``key`` may list several, comma-separated."""
    repo, commit = (", ".join(OFFICIAL[k][i] for k in key.split(",")) for i in (0, 1))
    source = json.dumps({"repository": repo, "commit": commit, "functions": functions})
    np.savez_compressed(OUT / f"e2e_{name}.npz", source=np.array(source), **arrays)
    print(f"e2e_{name}.npz: {(OUT / f'e2e_{name}.npz').stat().st_size / 1024:.0f} KB")


def numpy2_for_imgaug() -> None:
    """imgaug 0.4, which DRAEM's data_loader imports, reads np.sctypes (removed in numpy 2)."""
    np.sctypes = {"float": [np.float16, np.float32, np.float64], "int": [np.int8, np.int16, np.int32, np.int64],
                  "uint": [np.uint8, np.uint16, np.uint32, np.uint64], "complex": [np.complex64, np.complex128],
                  "others": [bool, object, bytes, str, np.void]}


def seeded_resnet18(seed: int = 0) -> torch.nn.Module:
    """torchvision's resnet18 with the seeded weights (what the official code would download)."""
    model = torchvision.models.resnet.resnet18()  # the module attribute, which a harness may patch
    model.load_state_dict(seeded_state(model, seed))
    return model


# -- PaDiM ----------------------------------------------------------------------------------------------
def padim(checkout: Path) -> None:
    """main.main (resnet18 branch) on 96 training and 4 test 32-pixel images (enough training images for a
    well-conditioned covariance, so that float32 and float64 agree closely): hooks on layer1..3,
    embedding_concat, random.sample(448, 100) under seed 1024, np.cov + 0.01 I, scipy mahalanobis,
    bilinear upsampling to the input, gaussian_filter σ=4, min-max normalisation, image score = max."""
    main = _import(checkout / "main.py", "padim_official_main_e2e")
    size = 32
    train, test = to_tensor(parity_images(96, size, seed=1)), to_tensor(parity_images(4, size, seed=2))
    labels = torch.tensor([0, 1, 0, 1])
    masks = torch.zeros(4, 1, size, size)
    masks[1, :, 4:20, 4:20] = 1
    masks[3, :, 10:25, 10:25] = 1
    main.mvtec.CLASS_NAMES = ["stub"]
    main.mvtec.MVTecDataset = lambda root, class_name, is_train: (
        [(x, 0, torch.zeros(1, size, size)) for x in train] if is_train
        else [(x, int(y), m) for x, y, m in zip(test, labels, masks)])
    main.resnet18 = lambda pretrained, progress: seeded_resnet18()
    records: dict = {"smoothed": []}
    real_filter = main.gaussian_filter

    def recording_filter(array, sigma):
        records["smoothed"].append(real_filter(array, sigma=sigma))
        return records["smoothed"][-1]

    main.gaussian_filter = recording_filter
    main.plot_fig = lambda test_img, scores, *rest: records.__setitem__("scores", scores.copy())
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["main.py", "--data_path", tmp, "--save_path", tmp, "--arch", "resnet18"]
        main.main()
    import random

    random.seed(1024)
    idx = np.array(random.sample(range(0, 448), 100))
    smoothed = np.stack(records["smoothed"]).astype(np.float32)
    save("padim", "padim", "main.main (resnet18 branch, end to end on seeded weights): forward hooks, "
         "embedding_concat, random.sample channel draw, np.cov + 0.01*I, scipy mahalanobis, F.interpolate "
         "bilinear, gaussian_filter sigma=4, min-max normalisation, img_scores = max",
         feature_index=idx, maps=smoothed, scores=smoothed.reshape(4, -1).max(1),
         normalised_scores=records["scores"].reshape(4, -1).max(1).astype(np.float32))


# -- PatchCore ------------------------------------------------------------------------------------------
def patchcore(checkout: Path) -> None:
    """PatchCore.load (as its run script: backbone handed over in training mode, so feature_dimensions'
    all-ones pass moves the batch-norm statistics), fit and predict with IdentitySampler (whole bank),
    FaissNN with 1 neighbour, layers 2+3, 1024/1024, patch 3, on 8 training and 4 test 64-pixel images.
    Also records the official RescaleSegmentor applied to the square roots of the official patch scores
    (faiss returns squared distances; ours are Euclidean: the documented deviation)."""
    sys.path.insert(0, str(checkout / "src"))
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    size = 64
    train, test = to_tensor(parity_images(8, size, seed=3)), to_tensor(parity_images(4, size, seed=4))
    model = patchcore.patchcore.PatchCore(torch.device("cpu"))
    model.load(seeded_resnet18(), ["layer2", "layer3"], torch.device("cpu"), (3, size, size), 1024, 1024,
               patchsize=3, anomaly_score_num_nn=1, featuresampler=patchcore.sampler.IdentitySampler(),
               nn_method=patchcore.common.FaissNN(False, 1))
    model.fit([train])
    segmentor, recorded = model.anomaly_segmentor, []
    convert = segmentor.convert_to_segmentation
    segmentor.convert_to_segmentation = lambda scores: recorded.append(scores) or convert(scores)
    scores, maps = model.predict(test)
    euclidean = convert(np.sqrt(np.asarray(recorded[0])))
    save("patchcore", "patchcore", "patchcore.patchcore.PatchCore.load/fit/predict (_embed, IdentitySampler, "
         "NearestNeighbourScorer + FaissNN(1), PatchMaker.score, RescaleSegmentor sigma=4); "
         "RescaleSegmentor.convert_to_segmentation on the square roots of the patch scores",
         maps=np.stack(maps).astype(np.float32), scores=np.asarray(scores, dtype=np.float32),
         euclidean_maps=np.stack(euclidean).astype(np.float32))


# -- STFPM ----------------------------------------------------------------------------------------------
STFPM_GRID = np.r_[0:256:5, 255]


def stfpm(checkout: Path) -> None:
    """main.test on two 256-pixel images (ResNet18_MS3 teacher with the seeded weights of seed 0, student
    with those of seed 1, standing in for a trained one), then main's cv2.resize to 256 and image score =
    the map's maximum (its Image-AUC). Maps are kept on a subsampled grid (``grid``)."""
    main = _import(checkout / "main.py", "stfpm_official_main_e2e")
    import cv2

    main.models.resnet18 = lambda pretrained: seeded_resnet18(0 if pretrained else 1)
    teacher, student = main.ResNet18_MS3(pretrained=True), main.ResNet18_MS3(pretrained=False)
    images = to_tensor(parity_images(2, 256, seed=5))
    loader = torch.utils.data.DataLoader([("x", image) for image in images], batch_size=2, shuffle=False)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        maps64 = main.test(teacher, student, loader)
    finally:
        torch.Tensor.cuda = cuda
    maps = np.stack([cv2.resize(m, (256, 256)) for m in maps64])
    save("stfpm", "stfpm", "main.ResNet18_MS3, main.test (normalised distances, bilinear 64x64, product), "
         "main's cv2.resize to 256 and scores.max(-1).max(-1)",
         grid=STFPM_GRID, maps_on_grid=maps[:, STFPM_GRID][:, :, STFPM_GRID].astype(np.float32),
         scores=maps.reshape(2, -1).max(1).astype(np.float32))


# -- FastFlow -------------------------------------------------------------------------------------------
def fastflow_flow_name(official: str) -> str:
    """Our name of an official flow tensor: nf_flows.i.module_list.j.* -> flows.i.blocks.j.*."""
    return official.replace("nf_flows.", "flows.").replace(".module_list.", ".blocks.")


def fastflow(checkout: Path, freia: Path) -> None:
    """fastflow.FastFlow (configs/resnet18.yaml: 8 flow steps, 3x3 convolutions only, hidden ratio 1) at a
    64-pixel input, eval-mode forward's anomaly_map on 4 images; backbone, LayerNorms and flows carry
    the seeded values (flows seeded under our tensor names); the flows' random channel permutations
    are recorded. The official code reports no image score: ours is the map's maximum (recorded)."""
    sys.path[:0] = [str(freia), str(checkout)]
    import fastflow as official

    create = official.timm.create_model
    official.timm.create_model = lambda *args, **kwargs: create(*args, **{**kwargs, "pretrained": False})
    torch.manual_seed(0)
    np.random.seed(0)
    model = official.FastFlow("resnet18", flow_steps=8, input_size=64, conv3x3_only=True, hidden_ratio=1.0)
    state = model.state_dict()
    flows = {fastflow_flow_name(k): v for k, v in state.items() if k.startswith("nf_flows") and "w_perm" not in k}
    seeded = {**seeded_state(model.feature_extractor), **seeded_tensors(
        {k: v for k, v in state.items() if k.startswith("norms")}), **seeded_tensors(flows)}
    model.feature_extractor.load_state_dict({k: seeded[k] for k in model.feature_extractor.state_dict()})
    model.load_state_dict({**state, **{k: seeded[k] for k in state if k.startswith("norms")},
                           **{k: seeded[fastflow_flow_name(k)] for k in state if fastflow_flow_name(k) in flows}})
    permutations = {f"permutation_{i}_{j}": block.w_perm.detach()[:, :, 0, 0].argmax(1).numpy()
                    for i, flow in enumerate(model.nf_flows) for j, block in enumerate(flow.module_list)}
    model.eval()
    with torch.no_grad():
        maps = model(to_tensor(parity_images(4, 64, seed=6)))["anomaly_map"][:, 0].numpy()
    save("fastflow", "fastflow", "fastflow.FastFlow.__init__ (nf_fast_flow, FrEIA AllInOneBlock at the "
         "FrEIA commit make_fixtures names) and FastFlow.forward in eval mode (anomaly_map); score = max",
         maps=maps, scores=maps.reshape(4, -1).max(1), **permutations)


# -- DRAEM ----------------------------------------------------------------------------------------------
DRAEM_WIDTH = 8


def draem_names(ours: list[str], official: list[str], discriminative: bool) -> dict[str, str]:
    """Official tensor name -> ours: the reconstructive networks list their tensors in the same order;
    the discriminative decoders interleave differently (official up_b, db_b, up1, db1...; ours ups.*,
    merges.*), so those are renamed."""
    if not discriminative:
        return dict(zip(official, ours))
    renamed = {}
    for name in official:
        new = name.replace("encoder_segment.block", "encoder.blocks.").replace("decoder_segment.fin_out.0", "head")
        for k, tag in enumerate(("_b", "1", "2", "3", "4")):
            new = new.replace(f"decoder_segment.up{tag}.", f"ups.{k}.").replace(f"decoder_segment.db{tag}.", f"merges.{k}.")
        if new.startswith("encoder.blocks."):
            number, rest = new[len("encoder.blocks."):].split(".", 1)
            new = f"encoder.blocks.{int(number) - 1}.{rest}"
        renamed[name] = new
    return renamed


def draem(checkout: Path) -> None:
    """test_DRAEM.test on four 256-pixel images (two with masks), the official networks at width 8 (the
    official 128 / 64 would only slow the test) carrying the seeded values of our tensors of the same
    role; image scores and flattened maps are what test passes to roc_auc_score."""
    sys.path.insert(0, str(ROOT))
    from anomaly_framework.models.model_draem import DraemModel

    numpy2_for_imgaug()
    official = _import(checkout / "test_DRAEM.py", "draem_official_test_e2e")
    ours = seeded_state(DraemModel(DRAEM_WIDTH, DRAEM_WIDTH, image_size=256))
    rec = official.ReconstructiveSubNetwork
    seg = official.DiscriminativeSubNetwork
    official.ReconstructiveSubNetwork = lambda **kw: rec(**kw, base_width=DRAEM_WIDTH)
    official.DiscriminativeSubNetwork = lambda **kw: seg(**kw, base_channels=DRAEM_WIDTH)

    def load(path, map_location=None):
        discriminative = path.endswith("_seg.pckl")
        net = official.DiscriminativeSubNetwork(in_channels=6, out_channels=2) if discriminative else \
            official.ReconstructiveSubNetwork(in_channels=3, out_channels=3)
        prefix = "discriminative." if discriminative else "reconstructive."
        names = draem_names([k[len(prefix):] for k in ours if k.startswith(prefix)], list(net.state_dict()), discriminative)
        return {name: ours[prefix + mine] for name, mine in names.items()}

    images = to_tensor(parity_images(4, 256, seed=7), normalize=False)
    masks = torch.zeros(4, 1, 256, 256)
    masks[1, :, 32:96, 32:96] = masks[3, :, 100:180, 40:120] = 1
    samples = [{"image": x, "has_anomaly": np.array([float(m.max())], dtype=np.float32), "mask": m}
               for x, m in zip(images, masks)]
    recorded = []
    official.torch.load = load
    official.MVTecDRAEMTestDataset = lambda root, resize_shape: samples
    official.roc_auc_score = lambda truth, scores: recorded.append(np.asarray(scores).copy()) or 0.5
    official.write_results_to_file = lambda *args: None
    cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        with torch.no_grad():
            official.test(["stub"], "", "", "seeded")
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = cuda
    maps = recorded[1].reshape(4, 256, 256)
    save("draem", "draem", "test_DRAEM.test (ReconstructiveSubNetwork, DiscriminativeSubNetwork at width 8, "
         "softmax, out_mask_sm[:, 1] map, avg_pool2d(21, stride 1, padding 10) max image score)",
         grid=STFPM_GRID, maps_on_grid=maps[:, STFPM_GRID][:, :, STFPM_GRID].astype(np.float32),
         scores=recorded[0].astype(np.float32))


MODELS = {"padim": lambda a: padim(a.padim), "patchcore": lambda a: patchcore(a.patchcore),
          "stfpm": lambda a: stfpm(a.stfpm), "fastflow": lambda a: fastflow(a.fastflow, a.freia),
          "draem": lambda a: draem(a.draem), "preprocessing": lambda a: preprocessing(a)}


def preprocessing(args: argparse.Namespace) -> None:
    """Every official dataset transform on two PNG files (preprocessing_fixtures.py)."""
    from preprocessing_fixtures import official_preprocessing

    numpy2_for_imgaug()
    arrays = official_preprocessing({name: getattr(args, name) for name in ("padim", "patchcore", "stfpm", "fastflow", "draem")})
    save("preprocessing", "padim,patchcore,stfpm,fastflow,draem", "per model, its dataset's transform on two PNG files: PaDiM datasets/mvtec.py "
         "MVTecDataset (616004b); PatchCore patchcore.datasets.mvtec.MVTecDataset (fcaa92f); STFPM main.MVTecDataset "
         "+ main's transform (2598a5e); FastFlow dataset.MVTecDataset (2cf1f2f); DRAEM "
         "data_loader.MVTecDRAEMTestDataset (2dbf673)", **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("padim", "patchcore", "stfpm", "fastflow", "freia", "draem"):
        parser.add_argument(f"--{name}", type=Path)
    parser.add_argument("--only", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.only.split(","):
        MODELS[name](args)


if __name__ == "__main__":
    main()
