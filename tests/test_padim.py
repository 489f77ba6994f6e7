"""PaDiM's streaming statistics against the whole-dataset formula, and the paper's channel-subset rule."""
import torch

from anomaly_framework.models.model_padim import COVARIANCE_EPS, PadimModel


def test_streaming_mean_and_covariance_equal_the_batch_formula():
    torch.manual_seed(0)
    model = PadimModel(backbone="resnet18", pretrained=False)
    images = torch.rand(37, 3, 64, 64)
    model.begin_fit(len(images))
    for batch in images.split([8, 8, 5, 16]):  # uneven batches exercise the pairwise update
        model.update(batch)
    model.finalize()

    embedding = model.embed(images).double()  # [N, d, h, w]
    samples = embedding.permute(2, 3, 0, 1).reshape(-1, len(images), embedding.shape[1])  # [P, N, d]
    mean = samples.mean(dim=1)
    centred = samples - mean.unsqueeze(1)
    covariance = centred.transpose(1, 2) @ centred / (len(images) - 1)
    covariance += COVARIANCE_EPS * torch.eye(covariance.shape[-1], dtype=torch.float64)
    expected_inverse = torch.linalg.inv(covariance)
    assert torch.allclose(model.mean.double(), mean, atol=1e-5)
    scale = expected_inverse.abs().max()
    assert torch.allclose(model.inv_covariance.double() / scale, expected_inverse / scale, atol=1e-5)


def test_channel_subset_follows_the_paper_rule():
    assert PadimModel(backbone="resnet18", pretrained=False).feature_index.numel() == 100  # Rd100
    assert PadimModel(backbone="wide_resnet50_2", pretrained=False).feature_index.numel() == 550  # Rd550
    lite0 = PadimModel(backbone="efficientnet_lite0", pretrained=False)
    assert lite0.feature_index.numel() == sum(lite0.extractor.channels)  # fewer than 550 channels: all kept


def test_embedding_that_keeps_every_channel_is_the_plain_concatenation():
    """n_features = all channels skips the channel copy: same values as upsampling and concatenating by hand."""
    torch.manual_seed(0)
    model = PadimModel("resnet18", [1, 2], pretrained=False, n_features=64 + 128)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second = model.extract(images)
        expected = torch.cat([first, second.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)], dim=1)
        assert torch.equal(model.embed(images), expected)


def test_embedding_with_any_channel_order_and_grid_ratio_equals_interpolate_concat_select():
    """The stack written layer by layer equals the reference recipe (nearest interpolation to the first
    grid, concatenation, index_select) for an unsorted subset (the official random.sample draw) and for
    grids that are not whole multiples of each other (a 72-px input: 18, 9 and 5 cells)."""
    torch.manual_seed(0)
    model = PadimModel("resnet18", [1, 2, 3], pretrained=False, n_features=50)
    model.feature_index = torch.randperm(64 + 128 + 256)[:50]  # unsorted, layers interleaved
    for size in (64, 72):
        images = torch.randn(3, 3, size, size)
        with torch.no_grad():
            features = model.extract(images)
            grid = features[0].shape[-2:]
            upsampled = [features[0]] + [torch.nn.functional.interpolate(f, size=grid, mode="nearest") for f in features[1:]]
            expected = torch.cat(upsampled, dim=1).index_select(1, model.feature_index)
            assert torch.equal(model.embed(features), expected)
