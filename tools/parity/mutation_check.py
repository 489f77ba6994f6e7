"""Mutation check: breaks one line of a scoring path at a time, runs the parity tests that cover it,
restores the line, and prints a Markdown table of which tests failed (every row must name at least one).

    python tools/parity/mutation_check.py [--only WORD]

Stage cases break a model's own computation (tests/test_parity.py); glue cases break what turns a
model's output into the map and score a user reads, and the preprocessing before it
(tests/test_parity_end_to_end.py): score reductions, every sigma and upsampling mode a modeler passes,
normalisation constants, the crop, the train/eval mode of frozen parts, the map a score is taken from.
It edits the working tree while it runs: do not run other tests from the same tree at the same time.
Exits 1 if a mutation survives.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

STAGE, E2E = "tests/test_parity.py", "tests/test_parity_end_to_end.py"
CFLOW, CFLOW_MODEL, CFLOW_MODELER = ("tests/test_parity_cflow.py", "anomaly_framework/models/model_cflow.py",
                                     "anomaly_framework/modelers/modeler_cflow.py")
MB, FILTERS = "anomaly_framework/modelers/modeler_base.py", "anomaly_framework/ops/filters.py"
CONFIG = "anomaly_framework/config.py"
RD_MODEL, RD_BLOCKS = "anomaly_framework/models/model_reverse_distillation.py", "anomaly_framework/models/reverse_distillation_blocks.py"
DFM_MODEL = "anomaly_framework/models/model_dfm.py"
RD_TESTS, DFM_TESTS = "tests/test_parity_reverse_distillation.py", "tests/test_parity_dfm.py"
AGGREGATION = "anomaly_framework/models/patch_aggregation.py"
SN, SSN = "anomaly_framework/models/model_simplenet.py", "anomaly_framework/models/model_supersimplenet.py"
SN_MODELER, SN_TESTS = "anomaly_framework/modelers/modeler_simplenet.py", "tests/test_parity_simplenet.py"
E2E_NEW = "tests/test_parity_end_to_end_cflow_simplenet.py"  # CFlow, SimpleNet, SuperSimpleNet whole paths
# (model, file, line as it is, line broken, tests file, pytest -k selection)
CASES = [
 ("PaDiM", "anomaly_framework/models/model_padim.py", "COVARIANCE_EPS = 0.01", "COVARIANCE_EPS = 0.1", STAGE, "padim"),
 ("PaDiM", "anomaly_framework/models/model_padim.py", "return {\"patch_scores\": self._squared_distance(inputs).sqrt()}", "return {\"patch_scores\": self._squared_distance(inputs)}", STAGE, "padim"),
 ("PatchCore", AGGREGATION, "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=False)", "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=True)", STAGE, "patchcore"),
 ("PatchCore", "anomaly_framework/models/model_patchcore.py", "min_sq = anchor_sq.sqrt_().mean(1).square_()", "min_sq = anchor_sq.mean(1)", STAGE, "patchcore"),
 ("STFPM", "anomaly_framework/models/model_stfpm.py", "(F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)", "(t - s).pow(2).sum(dim=1)", STAGE, "stfpm"),
 ("STFPM", "anomaly_framework/models/model_stfpm.py", "grid = distances[0].shape[-2:]\n        product = distances[0]", "grid = tuple(4 * s for s in distances[0].shape[-2:])\n        product = upsample_maps(distances[0], grid)", STAGE, "stfpm"),
 ("FastFlow", "anomaly_framework/models/flow_components.py", "params = 0.1 * self.subnet(x1)", "params = self.subnet(x1)", STAGE, "fastflow"),
 ("FastFlow", "anomaly_framework/models/model_fastflow.py", "-torch.exp(-0.5 * z.square().mean(dim=1, keepdim=True))", "-torch.exp(-0.5 * z.square().sum(dim=1, keepdim=True))", STAGE, "fastflow"),
 ("DRAEM", "anomaly_framework/models/model_draem.py", "count_include_pad=True", "count_include_pad=False", STAGE, "draem"),
 ("DRAEM", "anomaly_framework/models/model_draem.py", "one_hot = torch.cat([1 - target, target], dim=1).clamp(smooth, 1.0 - smooth)", "one_hot = torch.cat([1 - target, target], dim=1)", STAGE, "draem"),
 ("smoothing", FILTERS, "return torch.where(positions < size, positions, 2 * size - 1 - positions)", "return torch.where(positions < size, positions, 2 * size - 2 - positions).clamp(0, size - 1)", STAGE, "padim or patchcore"),
 ("AU-PRO", "anomaly_framework/metrics/metrics_base.py", "weight = np.where(sorted_regions > 0, 1.0 / (region_sizes[sorted_regions] * offset), 0.0)", "weight = np.where(sorted_regions > 0, 1.0 / (sorted_regions > 0).sum(), 0.0)", STAGE, "aupro"),
 ("SSIM", "anomaly_framework/metrics/ssim.py", "c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2", "c1, c2 = (k1 * data_range) ** 2, (k1 * data_range) ** 2", STAGE, "ssim"),
 ("SimpleNet (aggregation)", AGGREGATION, "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=False)", "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=True)", SN_TESTS, "test_simplenet"),
 ("SimpleNet (adaptor)", SN, "return self.adaptor(self.embed(inputs))", "return self.embed(inputs) + self.adaptor(self.embed(inputs))", SN_TESTS, "test_simplenet"),
 ("SimpleNet (noise)", SN, "rows + noise.reshape(rows.shape)", "rows + 2 * noise.reshape(rows.shape)", SN_TESTS, "test_simplenet"),
 ("SimpleNet (discriminator)", SN, "nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]", "nn.BatchNorm1d(hidden), nn.LeakyReLU(0.1)]", SN_TESTS, "test_simplenet"),
 ("SimpleNet (loss)", SN, "torch.clamp(margin + anomalous, min=0)]", "torch.clamp(anomalous, min=0)]", SN_TESTS, "test_simplenet"),
 ("SimpleNet (map sign)", SN, "return {\"patch_scores\": -self.discriminator(rows)", "return {\"patch_scores\": self.discriminator(rows)", SN_TESTS, "test_simplenet"),
 ("SimpleNet (map smoothing)", SN, "upsample_maps(outputs[\"patch_scores\"], size), self.sigma)", "upsample_maps(outputs[\"patch_scores\"], size), self.sigma / 2)", SN_TESTS, "test_simplenet"),
 ("SimpleNet (score)", SN, "return outputs[\"patch_scores\"].amax(dim=(1, 2, 3))", "return outputs[\"patch_scores\"].mean(dim=(1, 2, 3))", SN_TESTS, "test_simplenet"),
 ("SimpleNet (discriminator decay coupled)", SN_MODELER, "\"decoupled_weight_decay\": train[\"optimizer\"] == \"adamw\"},", "\"decoupled_weight_decay\": True},", SN_TESTS, "test_simplenet"),
 ("SimpleNet, SuperSimpleNet (adaptor lr)", SN_MODELER, "{\"params\": adaptor, \"lr\": train[\"adaptor_lr\"]", "{\"params\": adaptor, \"lr\": train[\"lr\"]", SN_TESTS, "simplenet"),
 ("SimpleNet, SuperSimpleNet (adaptor decay)", SN_MODELER, "\"weight_decay\": train[\"adaptor_weight_decay\"],", "\"weight_decay\": train[\"weight_decay\"],", SN_TESTS, "simplenet"),
 ("SuperSimpleNet (upscaling)", SSN, "mode=\"bilinear\", align_corners=True) for layer in layers], 1)", "mode=\"bilinear\", align_corners=False) for layer in layers], 1)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (neighbourhood mean)", SSN, "self.patch_size, stride=1, padding=self.patch_size // 2)", "self.patch_size, stride=1, padding=self.patch_size // 2, count_include_pad=False)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (adaptor)", SSN, "adapted = self.adaptor(self.features(inputs))", "adapted = self.features(inputs)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (noise mask)", SSN, "self.heads(doubled + noise * masks)", "self.heads(doubled + noise)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (labels)", SSN, "\"label\": masks.flatten(1).amax(dim=1)}", "\"label\": masks.flatten(1).mean(dim=1)}", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (segmentation head)", SSN, "nn.BatchNorm2d(seg_hidden),\n                                          nn.LeakyReLU(0.2)", "nn.BatchNorm2d(seg_hidden),\n                                          nn.LeakyReLU(0.1)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (stop_grad)", SSN, "seen = seg.detach() if self.stop_grad else seg", "seen = seg", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (classification pooling)", SSN, "conv.amax(dim=(2, 3)), conv.mean(dim=(2, 3))", "conv.mean(dim=(2, 3)), conv.amax(dim=(2, 3))", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (focal)", SSN, "return (bce * (1 - p_t) ** gamma).mean()", "return (bce * (1 - p_t) ** 2).mean()", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (truncated L1 sign)", SSN, "truncated_l1(-seg[mask == 0], -seg[mask > 0], self.margin)", "truncated_l1(seg[mask == 0], seg[mask > 0], self.margin)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (blur border)", SSN, "mode=\"reflect\")", "mode=\"replicate\")", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (blur taps)", SSN, "truncate=math.ceil(3 * sigma) / sigma)", "truncate=4.0)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (score)", SSN, "return torch.sigmoid(outputs[\"score\"])", "return outputs[\"score\"]", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (Perlin threshold)", SSN, "mask = (noise[0] > threshold).float()", "mask = (noise[0] > threshold + 0.1).float()", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (Perlin resize)", SSN, "size=(height, width), mode=\"bilinear\", align_corners=False)", "size=(height, width), mode=\"bilinear\", align_corners=True)", SN_TESTS, "supersimplenet"),
 ("SuperSimpleNet (Perlin empty draw)", SSN, "return mask * 0 if rng.random() > 0.5 else mask", "return mask * 0 if rng.random() < 0.5 else mask", SN_TESTS, "supersimplenet"),
 ("Reverse Distillation (OCBE fusion)", RD_BLOCKS, "fused = torch.cat([self.level1_down(features[0]), self.level2_down(features[1]), features[2]], dim=1)", "fused = torch.cat([self.level2_down(features[1]), self.level1_down(features[0]), features[2]], dim=1)", RD_TESTS, "not pinned"),
 ("Reverse Distillation (residual block)", RD_BLOCKS, "out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))", "out = self.bn2(self.conv2(self.bn1(self.conv1(x))))", RD_TESTS, "not pinned"),
 ("Reverse Distillation (bottleneck block)", RD_BLOCKS, "out = self.bn3(self.conv3(self.relu(out)))", "out = self.bn3(self.conv3(out))", RD_TESTS, "not pinned"),
 ("Reverse Distillation (block output)", RD_BLOCKS, "return self.relu(out + identity)", "return out + identity", RD_TESTS, "not pinned"),
 ("Reverse Distillation (decoder upsampling)", RD_BLOCKS, "return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)", "return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=True)", RD_TESTS, "not pinned"),
 ("Reverse Distillation (loss flattening)", RD_MODEL, "return sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean()", "return sum((1 - F.cosine_similarity(e, d, dim=1)).mean()", RD_TESTS, "not pinned"),
 ("Reverse Distillation (level map)", RD_MODEL, "return [(1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1)", "return [(1 - F.cosine_similarity(e, d, dim=1)).square().unsqueeze(1)", RD_TESTS, "not pinned"),
 ("Reverse Distillation (map corners)", RD_MODEL, "return sum(F.interpolate(level, size=tuple(size), mode=\"bilinear\", align_corners=True)", "return sum(F.interpolate(level, size=tuple(size), mode=\"bilinear\", align_corners=False)", RD_TESTS, "not pinned"),
 ("Reverse Distillation (sigma passed)", "anomaly_framework/modelers/modeler_reverse_distillation.py", "self.model.sigma)", "self.model.sigma / 2)", RD_TESTS, "not pinned"),
 ("Reverse Distillation (sigma default)", RD_MODEL, "weights: str | None = None, sigma: float = 4.0)", "weights: str | None = None, sigma: float = 2.0)", RD_TESTS, "not pinned"),
 ("DFM (pooling)", DFM_MODEL, "features = F.avg_pool2d(features, kernel_size=self.pooling_kernel_size)", "features = F.max_pool2d(features, kernel_size=self.pooling_kernel_size)", DFM_TESTS, "not pinned"),
 ("DFM (PCA centring)", DFM_MODEL, "torch.linalg.svd((rows - mean).double(), full_matrices=False)", "torch.linalg.svd(rows.double(), full_matrices=False)", DFM_TESTS, "not pinned"),
 ("DFM (components kept)", DFM_MODEL, "count = int(torch.nonzero(ratios >= level)[0])", "count = int(torch.nonzero(ratios >= level)[0]) + 1", DFM_TESTS, "not pinned"),
 ("DFM (FRE map)", DFM_MODEL, "patch_scores = error.reshape(pooled.shape).sum(dim=1, keepdim=True)", "patch_scores = error.reshape(pooled.shape).mean(dim=1, keepdim=True)", DFM_TESTS, "not pinned"),
 ("DFM (FRE score)", DFM_MODEL, "scores = error.sum(dim=1)", "scores = error.mean(dim=1)", DFM_TESTS, "not pinned"),
 ("DFM (NLL normaliser)", DFM_MODEL, "scores = whitened.square().sum(dim=1) + 2 * self.gaussian_scales.log().sum()", "scores = whitened.square().sum(dim=1)", DFM_TESTS, "not pinned"),
 ("DFM (Gaussian scale)", DFM_MODEL, "scaled = (coefficients - mean).T / rows.shape[0] ** 0.5", "scaled = (coefficients - mean).T / (rows.shape[0] - 1) ** 0.5", DFM_TESTS, "not pinned"),
 ("DFM (leave-one-out)", DFM_MODEL, "keep[index] = False", "keep[index] = True", DFM_TESTS, "not pinned"),
 ("DFM (upsampling mode)", "anomaly_framework/modelers/modeler_dfm.py", "return upsample_maps(outputs[\"patch_scores\"], self.input_size(batch))", "return upsample_maps(outputs[\"patch_scores\"], self.input_size(batch), mode=\"nearest\")", DFM_TESTS, "not pinned"),
 ("DFM (score from the model)", "anomaly_framework/modelers/modeler_dfm.py", "return outputs[\"image_scores\"]", "return maps.amax(dim=(1, 2, 3))", DFM_TESTS, "not pinned"),
 # -- glue: maps and scores ----------------------------------------------------------------------
 ("all (score reduction)", MB, "return maps.amax(dim=(1, 2, 3))", "return maps.mean(dim=(1, 2, 3))", E2E, "end_to_end"),
 ("all (evaluation mode)", MB, "self.model.eval()\n        if held_out is None:", "self.model.train()\n        if held_out is None:", E2E, "end_to_end"),
 ("frozen backbones (train/eval)", "anomaly_framework/backbones/extractors.py", "return super().train(mode and not getattr(self, \"frozen\", False))", "return super().train(mode)", E2E, "end_to_end"),
 ("PaDiM, PatchCore (upsampling mode)", MB, "sigma: float, mode: str = \"bilinear\"):", "sigma: float, mode: str = \"nearest\"):", E2E, "padim or patchcore"),
 ("all (upsampling corners)", FILTERS, "return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)", "return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=True)", E2E, "end_to_end"),
 ("all (Gaussian truncation)", FILTERS, "def gaussian_kernel1d(sigma: float, truncate: float = 4.0)", "def gaussian_kernel1d(sigma: float, truncate: float = 3.0)", E2E, "end_to_end"),
 ("PaDiM (sigma passed)", "anomaly_framework/modelers/modeler_padim.py", "self.input_size(batch), self.model.sigma)", "self.input_size(batch), self.model.sigma / 2)", E2E, "padim"),
 ("PaDiM (sigma default)", CONFIG, "\"sigma\": 4.0,\n            \"feature_seed\"", "\"sigma\": 2.0,\n            \"feature_seed\"", E2E, "padim"),
 ("PatchCore (sigma passed)", "anomaly_framework/modelers/modeler_patchcore.py", "self.input_size(batch), self.model.sigma)", "self.input_size(batch), self.model.sigma / 2)", E2E, "patchcore"),
 ("PatchCore (sigma default)", CONFIG, "\"sigma\": 4.0,\n            \"bank_dtype\"", "\"sigma\": 2.0,\n            \"bank_dtype\"", E2E, "patchcore"),
 ("PatchCore (score from the map)", "anomaly_framework/modelers/modeler_patchcore.py", "return outputs[\"image_scores\"]", "return maps.amax(dim=(1, 2, 3))", E2E, "patchcore"),
 ("STFPM (upsampling mode)", "anomaly_framework/models/model_stfpm.py", "return upsample_maps(self.grid_map(outputs), size)", "return upsample_maps(self.grid_map(outputs), size, mode=\"nearest\")", E2E, "stfpm"),
 ("STFPM (level upsampling mode)", "anomaly_framework/models/model_stfpm.py", "product = product * upsample_maps(level, grid)", "product = product * upsample_maps(level, grid, mode=\"nearest\")", E2E, "stfpm"),
 ("STFPM (level product)", "anomaly_framework/models/model_stfpm.py", "product = product * upsample_maps(level, grid)", "product = product + upsample_maps(level, grid)", E2E, "stfpm"),
 ("FastFlow (upsampling mode)", "anomaly_framework/models/model_fastflow.py", "keepdim=True)), size) for z", "keepdim=True)), size, mode=\"nearest\") for z", E2E, "fastflow"),
 ("FastFlow (level average)", "anomaly_framework/models/model_fastflow.py", "return torch.stack(maps).mean(dim=0)", "return torch.stack(maps).amax(dim=0)", E2E, "fastflow"),
 ("DRAEM (map channel)", "anomaly_framework/models/model_draem.py", "return outputs[\"logits\"].float().softmax(dim=1)[:, 1:]", "return outputs[\"logits\"].float().softmax(dim=1)[:, :1]", E2E, "draem"),
 ("DRAEM (score from the pooled map)", "anomaly_framework/modelers/modeler_draem.py", "return self.model.image_score(maps)", "return maps.amax(dim=(1, 2, 3))", E2E, "draem"),
 ("DRAEM (score filter default)", CONFIG, "\"score_filter\": 21,", "\"score_filter\": 11,", E2E, "draem"),
 ("AE/VAE (sigma passed)", "anomaly_framework/modelers/modeler_autoencoder.py", "self.model.sigma)", "self.model.sigma / 2)", E2E, "autoencoder"),
 ("AE/VAE (sigma default)", CONFIG, "\"map_kind\": \"l2\", \"sigma\": 4.0}", "\"map_kind\": \"l2\", \"sigma\": 2.0}", E2E, "autoencoder"),
 ("AE/VAE (residual map)", "anomaly_framework/models/model_base.py", "error = (images - reconstruction).square().sum(dim=1, keepdim=True)", "error = (images - reconstruction).square().mean(dim=1, keepdim=True)", E2E, "autoencoder"),
 ("VAE (posterior mean at evaluation)", "anomaly_framework/models/model_vae.py", "latent = reparameterize(mu, log_var, self.training)", "latent = reparameterize(mu, log_var, True)", E2E, "autoencoder"),
 # -- CFlow-AD, stage by stage (tests/test_parity_cflow.py) --------------------------------------------
 ("CFlow (encoding frequencies)", CFLOW_MODEL, "* -(math.log(1e4) / half))", "* -(math.log(1e4) / channels))", CFLOW, "cflow"),
 ("CFlow (encoder padding)", CFLOW_MODEL, "conv.padding_mode = \"reflect\"", "conv.padding_mode = \"zeros\"", CFLOW, "cflow"),
 ("CFlow (encoder levels)", CONFIG, "\"layers\": [2, 3, 4]", "\"layers\": [1, 2, 3]", CFLOW, "cflow"),
 ("CFlow (clamp default)", CONFIG, "\"clamp\": 1.9", "\"clamp\": 2.0", CFLOW, "cflow"),
 ("CFlow (subnet width)", CFLOW_MODEL, "AllInOneCoupling(channels, 1, 2.0, clamp", "AllInOneCoupling(channels, 1, 1.0, clamp", CFLOW, "cflow"),
 ("CFlow (soft permutation)", "anomaly_framework/models/flow_components.py", "F.linear(y, rotation.flatten(1))", "F.linear(y, rotation.flatten(1).T)", CFLOW, "cflow"),
 ("CFlow (condition)", "anomaly_framework/models/flow_components.py", "torch.cat([x1, condition], dim=1)", "torch.cat([condition, x1], dim=1)", CFLOW, "cflow"),
 ("CFlow (likelihood per dimension)", CFLOW_MODEL, "+ log_det) / channels", "+ log_det)", CFLOW, "cflow"),
 ("CFlow (loss)", CFLOW_MODEL, "return -F.logsigmoid(log_prob)", "return -log_prob", CFLOW, "cflow"),
 ("CFlow (fiber batch default)", CONFIG, "\"fiber_batch\": 256", "\"fiber_batch\": 128", CFLOW, "cflow"),
 ("CFlow (shuffled fibers)", CFLOW_MODELER, "chosen = order[start:start + size]", "chosen = torch.arange(start, start + size)", CFLOW, "cflow"),
 ("CFlow (warm-up start)", CFLOW_MODELER, "start = self.lr / 10.0", "start = self.lr / 5.0", CFLOW, "cflow"),
 ("CFlow (cosine floor)", CFLOW_MODELER, "COSINE_DECAY = 0.1 ** 3", "COSINE_DECAY = 0.1 ** 2", CFLOW, "cflow"),
 ("CFlow (max-subtraction)", CFLOW_MODEL, "torch.exp(log_prob - maximum)", "torch.exp(log_prob - 0.5 * maximum)", CFLOW, "cflow"),
 ("CFlow (upsampling corners)", CFLOW_MODEL, "align_corners=True)", "align_corners=False)", CFLOW, "cflow"),
 ("CFlow (fitted maxima)", CFLOW_MODELER, "level_max=self.model.log_prob_max.unbind()", "level_max=None", CFLOW, "cflow"),
 # -- glue of CFlow, SimpleNet, SuperSimpleNet (tests/test_parity_end_to_end_cflow_simplenet.py) -------
 ("SimpleNet (crop ratio, e2e)", CONFIG, "\"data\": {\"image_size\": 288, \"crop_ratio\": 288 / 329,", "\"data\": {\"image_size\": 288, \"crop_ratio\": 1.0,", E2E_NEW, "simplenet"),
 ("CFlow (resize filter, e2e)", CONFIG, "\"crop_ratio\": 1.0, \"interpolation\": \"lanczos\", \"batch_size\": 32", "\"crop_ratio\": 1.0, \"interpolation\": \"bilinear\", \"batch_size\": 32", E2E_NEW, "cflow"),
 ("SimpleNet, CFlow (normalisation mean, e2e)", "anomaly_framework/ops/normalize.py", "IMAGENET_MEAN = (0.485, 0.456, 0.406)", "IMAGENET_MEAN = (0.406, 0.456, 0.485)", E2E_NEW, "preprocessing"),
 ("SimpleNet (resize filter, e2e)", CONFIG, "\"crop_ratio\": 288 / 329, \"batch_size\": 8,", "\"crop_ratio\": 288 / 329, \"interpolation\": \"bicubic\", \"batch_size\": 8,", E2E_NEW, "simplenet"),
 ("SimpleNet (normalisation, e2e)", CONFIG, "\"crop_ratio\": 288 / 329, \"batch_size\": 8,", "\"crop_ratio\": 288 / 329, \"normalize\": \"none\", \"batch_size\": 8,", E2E_NEW, "simplenet"),
 ("SuperSimpleNet (normalisation, e2e)", CONFIG, "\"crop_ratio\": 1.0, \"batch_size\": 32, \"val_fraction\": 0.2},\n    },\n}", "\"crop_ratio\": 1.0, \"normalize\": \"none\", \"batch_size\": 32, \"val_fraction\": 0.2},\n    },\n}", E2E_NEW, "supersimplenet"),
 ("CFlow (normalisation, e2e)", CONFIG, "\"crop_ratio\": 1.0, \"interpolation\": \"lanczos\", \"batch_size\": 32", "\"crop_ratio\": 1.0, \"interpolation\": \"lanczos\", \"normalize\": \"none\", \"batch_size\": 32", E2E_NEW, "cflow"),
 ("SimpleNet (backbone layers default, e2e)", CONFIG, "\"layers\": [2, 3], \"pretrained\": True, \"weights\": None,\n                  \"patch_size\": 3, \"pre_embed_dim\"", "\"layers\": [1, 2], \"pretrained\": True, \"weights\": None,\n                  \"patch_size\": 3, \"pre_embed_dim\"", E2E_NEW, "simplenet"),
 ("SimpleNet (map upsampling mode, e2e)", SN, "upsample_maps(outputs[\"patch_scores\"], size), self.sigma)", "upsample_maps(outputs[\"patch_scores\"], size, mode=\"nearest\"), self.sigma)", E2E_NEW, "simplenet"),
 ("SimpleNet, SuperSimpleNet (score from the smoothed map, e2e)", SN_MODELER, "return self.model.image_score(outputs)", "return maps.amax(dim=(1, 2, 3))", E2E_NEW, "simplenet"),
 ("SuperSimpleNet (map upsampling mode, e2e)", SSN, "upsample_maps(outputs[\"map\"], size), self.sigma)", "upsample_maps(outputs[\"map\"], size, mode=\"nearest\"), self.sigma)", E2E_NEW, "supersimplenet"),
 ("CFlow (map upsampling mode, e2e)", CFLOW_MODEL, "size=tuple(size), mode=\"bilinear\",", "size=tuple(size), mode=\"bicubic\",", E2E_NEW, "cflow"),
 ("CFlow (run shift, e2e)", CFLOW_MODELER, "shift=float(len(outputs[\"log_prob\"])))", "shift=None)", E2E_NEW, "cflow"),
 # -- glue: preprocessing --------------------------------------------------------------------------
 ("all (normalisation mean)", "anomaly_framework/ops/normalize.py", "IMAGENET_MEAN = (0.485, 0.456, 0.406)", "IMAGENET_MEAN = (0.406, 0.456, 0.485)", E2E, "preprocessing"),
 ("all (normalisation std)", "anomaly_framework/ops/normalize.py", "IMAGENET_STD = (0.229, 0.224, 0.225)", "IMAGENET_STD = (0.225, 0.224, 0.229)", E2E, "preprocessing"),
 ("all (crop position)", "anomaly_framework/images/geometry.py", "return (resize - size) // 2", "return 0", E2E, "preprocessing"),
 ("PaDiM (crop ratio)", CONFIG, "\"crop_ratio\": 0.875, \"interpolation\": \"lanczos\"", "\"crop_ratio\": 1.0, \"interpolation\": \"lanczos\"", E2E, "preprocessing"),
 ("PaDiM (resize filter)", CONFIG, "\"crop_ratio\": 0.875, \"interpolation\": \"lanczos\"", "\"crop_ratio\": 0.875, \"interpolation\": \"bilinear\"", E2E, "preprocessing"),
 ("PatchCore (crop ratio)", CONFIG, "\"crop_ratio\": 0.875, \"interpolation\": \"bilinear\", \"batch_size\": 8", "\"crop_ratio\": 0.8, \"interpolation\": \"bilinear\", \"batch_size\": 8", E2E, "preprocessing"),
 ("STFPM, FastFlow (resize filter)", CONFIG, "\"interpolation\": \"bilinear\",  # bilinear", "\"interpolation\": \"bicubic\",  # bilinear", E2E, "preprocessing"),
 ("DRAEM (normalisation)", CONFIG, "\"crop_ratio\": 1.0, \"normalize\": \"none\", \"batch_size\": 8", "\"crop_ratio\": 1.0, \"normalize\": \"imagenet\", \"batch_size\": 8", E2E, "preprocessing"),
 ("AE/VAE (normalisation)", CONFIG, "\"crop_ratio\": 1.0, \"normalize\": \"none\", \"batch_size\": 32", "\"crop_ratio\": 1.0, \"normalize\": \"imagenet\", \"batch_size\": 32", E2E, "preprocessing"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose model column contains this")
    only = parser.parse_args().only
    print("| model | file | line | broken to | failed tests |\n|---|---|---|---|---|", flush=True)
    survivors = 0
    for model, path, old, new, tests, selection in CASES:
        if only not in model:
            continue
        text = open(path).read()
        assert text.count(old) == 1, (path, old)
        open(path, "w").write(text.replace(old, new))
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", tests, "-k", selection, "-p", "no:cacheprovider"],
                                 capture_output=True, text=True).stdout
        finally:
            open(path, "w").write(text)
        failed = [line.split(" - ")[0].replace("FAILED ", "").split("::")[-1] for line in out.splitlines()
                  if line.startswith(("FAILED", "ERROR"))]
        survivors += not failed
        cell = lambda s: "`" + " ".join(s.split()).replace("|", "\\|") + "`"  # noqa: E731
        print(f"| {model} | {path.split('/')[-1]} | {cell(old)} | {cell(new)} | {', '.join(failed) or '**NONE**'} |",
              flush=True)
    print(f"\n{survivors} surviving mutation(s)")
    return int(survivors > 0)


if __name__ == "__main__":
    sys.exit(main())
