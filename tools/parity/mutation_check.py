"""Mutation check: breaks one line of each model's scoring path at a time, runs the parity tests that
cover it, restores the line, and prints which tests failed (every row must name at least one).

    python tools/parity/mutation_check.py

It edits the working tree while it runs: do not run other tests from the same tree at the same time.
"""
import subprocess
import sys

CASES = [
 ("PaDiM", "anomaly_framework/models/model_padim.py", "COVARIANCE_EPS = 0.01", "COVARIANCE_EPS = 0.1", "padim"),
 ("PaDiM", "anomaly_framework/models/model_padim.py", "return {\"patch_scores\": self._squared_distance(inputs).sqrt()}", "return {\"patch_scores\": self._squared_distance(inputs)}", "padim"),
 ("PatchCore", "anomaly_framework/models/model_patchcore.py", "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=False)", "layer = F.interpolate(layer.permute(0, 3, 1, 2), size=grid, mode=\"bilinear\", align_corners=True)", "patchcore"),
 ("PatchCore", "anomaly_framework/models/model_patchcore.py", "min_sq = anchor_sq.sqrt_().mean(1).square_()", "min_sq = anchor_sq.mean(1)", "patchcore"),
 ("STFPM", "anomaly_framework/models/model_stfpm.py", "(F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)", "(t - s).pow(2).sum(dim=1)", "stfpm"),
 ("STFPM", "anomaly_framework/models/model_stfpm.py", "grid = distances[0].shape[-2:]\n        product = distances[0]", "grid = tuple(4 * s for s in distances[0].shape[-2:])\n        product = upsample_maps(distances[0], grid)", "stfpm"),
 ("FastFlow", "anomaly_framework/models/flow_components.py", "params = 0.1 * self.subnet(x1)", "params = self.subnet(x1)", "fastflow"),
 ("FastFlow", "anomaly_framework/models/model_fastflow.py", "-torch.exp(-0.5 * z.square().mean(dim=1, keepdim=True))", "-torch.exp(-0.5 * z.square().sum(dim=1, keepdim=True))", "fastflow"),
 ("DRAEM", "anomaly_framework/models/model_draem.py", "count_include_pad=True", "count_include_pad=False", "draem"),
 ("DRAEM", "anomaly_framework/models/model_draem.py", "one_hot = torch.cat([1 - target, target], dim=1).clamp(smooth, 1.0 - smooth)", "one_hot = torch.cat([1 - target, target], dim=1)", "draem"),
 ("smoothing", "anomaly_framework/ops/filters.py", "return torch.where(positions < size, positions, 2 * size - 1 - positions)", "return torch.where(positions < size, positions, 2 * size - 2 - positions).clamp(0, size - 1)", "padim or patchcore"),
 ("AU-PRO", "anomaly_framework/metrics/metrics_base.py", "weight = np.where(sorted_regions > 0, 1.0 / (region_sizes[sorted_regions] * offset), 0.0)", "weight = np.where(sorted_regions > 0, 1.0 / (sorted_regions > 0).sum(), 0.0)", "aupro"),
 ("SSIM", "anomaly_framework/metrics/ssim.py", "c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2", "c1, c2 = (k1 * data_range) ** 2, (k1 * data_range) ** 2", "ssim"),
]
for model, path, old, new, k in CASES:
    text = open(path).read()
    assert text.count(old) == 1, (path, old)
    open(path, "w").write(text.replace(old, new))
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_parity.py", "-k", k, "-p", "no:cacheprovider"],
                             capture_output=True, text=True).stdout
    finally:
        open(path, "w").write(text)
    failed = [l.split(" - ")[0].replace("FAILED ", "") for l in out.splitlines() if l.startswith("FAILED")]
    print(f"{model} | {path}: `{old}` -> `{new}` | failed: {', '.join(failed) or 'NONE'}", flush=True)
