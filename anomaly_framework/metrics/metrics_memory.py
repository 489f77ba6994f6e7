"""Family metrics of the memory models (PaDiM, PatchCore): what the fit produced, reported once after it.

Memory models have no loss to follow while fitting. What a researcher compares instead is the fitted
statistics themselves, since they are the model: how many Gaussians or bank patches were kept, their
dimension, and the memory they take in the checkpoint and at test time (P11: PaDiM's covariances grow
with positions × d²; PatchCore's bank with patches × D).
"""
from __future__ import annotations

from torch import nn

from anomaly_framework.registry import METRICS_REGISTRY


@METRICS_REGISTRY.register("memory")
class MemoryMetrics:
    """Sizes of the fitted buffers; PatchCore adds its coreset statistics."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def compute_fit_metrics(self, model: nn.Module) -> dict:
        """``fitted_mb`` (the persistent buffers outside the frozen backbone) and the model's own counts."""
        persistent = model.state_dict()
        fitted = [tensor for name, tensor in persistent.items() if not name.startswith("extractor.")]
        report: dict = {"fitted_mb": round(sum(t.numel() * t.element_size() for t in fitted) / 2**20, 3)}
        if "memory_bank" in persistent:
            report["bank_patches"], report["bank_dim"] = persistent["memory_bank"].shape
        if hasattr(model, "inv_covariance"):
            report["gaussians"], report["feature_dim"] = model.inv_covariance.shape[:2]
        if getattr(model, "coreset_stats", None):
            report["coreset"] = dict(model.coreset_stats)
        return report
