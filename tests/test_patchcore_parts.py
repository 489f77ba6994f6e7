"""PatchCore building blocks: greedy coreset properties and chunked nearest-neighbour search."""
import pytest
import torch

from anomaly_framework.models.model_patchcore import PatchcoreModel, greedy_coreset
from anomaly_framework.models.nearest_neighbors import chunked_nearest, chunked_topk_nearest
from anomaly_framework.errors import FrameworkError


def _max_min_distance(points, selected):
    """Covering radius: the largest distance of any point to its nearest selected centre."""
    return torch.cdist(points, points[selected]).min(dim=1).values.max()


def test_coreset_distinct_ratio_and_deterministic():
    points = torch.randn(2000, 64)
    selected = greedy_coreset(points, 0.05, projection_dim=16, seed=3, progress=False)
    assert selected.numel() == int(2000 * 0.05)
    assert selected.unique().numel() == selected.numel()
    assert torch.equal(selected, greedy_coreset(points, 0.05, projection_dim=16, seed=3, progress=False))
    assert not torch.equal(selected, greedy_coreset(points, 0.05, projection_dim=16, seed=4, progress=False))


def test_coreset_covering_radius_never_increases_and_beats_random():
    torch.manual_seed(0)
    points = torch.randn(1500, 8)
    # Full-dimensional projection (identity-like) so the greedy guarantee holds in the original space.
    selected = greedy_coreset(points, 0.1, projection_dim=8, seed=0, progress=False)
    radii = [_max_min_distance(points, selected[:k]) for k in (5, 20, 60, 150)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(radii, radii[1:]))
    random_radius = _max_min_distance(points, torch.randperm(1500)[:150])
    assert radii[-1] < random_radius


@pytest.mark.parametrize("chunk_mb", [0.01, 0.5, 64.0])
def test_chunked_search_equals_brute_force(chunk_mb):
    torch.manual_seed(1)
    queries, bank = torch.randn(700, 48), torch.randn(2300, 48)
    reference = torch.cdist(queries, bank)
    distances, indices = chunked_nearest(queries, bank, chunk_mb)
    assert torch.allclose(distances, reference.min(1).values, atol=1e-4)
    assert torch.equal(indices, reference.argmin(1))
    top_d, top_i = chunked_topk_nearest(queries, bank, 9, chunk_mb)
    ref_d, ref_i = torch.topk(reference, 9, dim=1, largest=False)
    assert torch.allclose(top_d, ref_d, atol=1e-4)
    assert torch.equal(top_i, ref_i)


def test_float16_bank_search_close_to_float32():
    queries, bank = torch.randn(100, 32), torch.randn(500, 32)
    d32, _ = chunked_nearest(queries, bank)
    d16, _ = chunked_nearest(queries, bank.half())
    assert torch.allclose(d32, d16, atol=5e-2)


def test_memory_budget_refusal_names_the_keys():
    model = PatchcoreModel(backbone="resnet18", pretrained=False, memory_budget_mb=1.0)
    model.begin_fit(10)
    with pytest.raises(FrameworkError, match="coreset_ratio.*bank_dtype=float16.*image_size"):
        model.update(torch.randn(2, 3, 64, 64))


def _paper_reweighted(bank: torch.Tensor, queries: torch.Tensor, b: int, neighbours_of_match: bool = True):
    """Paper eq. 6-7 by brute force in float64: s* = max over patches of the nearest-bank distance; m_test*
    that patch, m* its nearest bank entry; s = (1 − exp‖m_test* − m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_test* − m‖)·s*,
    N_b(m*) the b bank entries nearest to m* (m* itself first). ``neighbours_of_match=False`` takes them
    around m_test* instead: a plausible misreading the test must tell apart."""
    scores = []
    for image in queries.double():  # [P, D]
        distances = torch.cdist(image, bank.double())
        nearest = distances.min(dim=1)
        worst = nearest.values.argmax()
        match = nearest.indices[worst]
        centre = bank.double()[match] if neighbours_of_match else image[worst]
        support = torch.cdist(centre[None], bank.double())[0].argsort()[:b]
        weight = 1 - torch.exp(distances[worst, match]) / torch.exp(distances[worst, support]).sum()
        scores.append(weight * nearest.values[worst])
    return torch.stack(scores)


def test_reweighted_image_score_equals_the_paper_formula():
    generator = torch.Generator().manual_seed(0)
    bank = torch.rand(60, 2, generator=generator) * 3  # distances of order 1: the softmax is not degenerate
    queries = torch.rand(3, 6, 2, generator=generator) * 4 - 0.5
    model = PatchcoreModel(backbone="resnet18", pretrained=False, coreset_ratio=1.0, num_neighbors=9)
    model.memory_bank = bank
    reweighted = model.score_patches(queries.reshape(3, 2, 3, 2))["image_scores"]
    expected = _paper_reweighted(bank, queries, 9)
    assert torch.allclose(reweighted.double(), expected, rtol=1e-5)
    misread = _paper_reweighted(bank, queries, 9, neighbours_of_match=False)
    assert (misread - expected).abs().max() > 1e-3  # the check above would catch that misreading
    model.score_mode = "max"
    plain = model.score_patches(queries.reshape(3, 2, 3, 2))["image_scores"]
    assert torch.allclose(plain.double(), torch.cdist(queries.double(), bank.double()).amin(2).amax(1), rtol=1e-5)


def _official_embedding(model, images):
    """The official aggregation written step by step: unfold, pool per layer, resize, stack, pool."""
    import torch.nn.functional as F

    features = model.extractor(images)
    grid = features[0].shape[-2:]
    layers = []
    for feature in features:
        batch, channels, height, width = feature.shape
        patches = F.unfold(feature, kernel_size=3, padding=1).reshape(batch, channels * 9, height, width)
        # The official code resizes the unfolded patches of deeper layers before pooling them.
        if (height, width) != tuple(grid):
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        flat = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * 9)
        layers.append(F.adaptive_avg_pool1d(flat, model.pre_embed_dim).squeeze(1))
    stacked = torch.stack(layers, dim=1).reshape(len(layers[0]), 1, -1)
    return F.adaptive_avg_pool1d(stacked, model.embed_dim).reshape(images.shape[0], *grid, -1)


@pytest.mark.parametrize("pre, final, fused", [(1024, 1024, False), (2048, 1024, True), (96, 64, False)])
def test_aggregation_equals_the_official_steps(pre, final, fused):
    torch.manual_seed(0)
    model = PatchcoreModel(backbone="resnet18", pretrained=False, pre_embed_dim=pre, embed_dim=final).eval()
    assert model.fused is fused
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fused = model.embed(images)
        reference = _official_embedding(model, images)
    assert fused.shape == reference.shape
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4)
