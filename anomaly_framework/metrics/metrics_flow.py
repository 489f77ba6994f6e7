"""Family metrics of flow models: log-likelihood per dimension and bits per dimension.

Under the standard-normal base, log p(x) = −½‖z‖² − ½·D·log(2π) + log|det J| with D the number of
latent values; per dimension this is comparable across stages and image sizes. Bits per dimension =
−log p(x) / (D·ln 2). Both are of the normalised features, not of pixels.
"""
from __future__ import annotations

import math

import torch

from anomaly_framework.registry import METRICS_REGISTRY


@METRICS_REGISTRY.register("flow")
class FlowMetrics:
    """Mean log-likelihood per dimension (nats) and bits per dimension over all stages."""

    def __init__(self, config: dict) -> None:
        self.config = config

    @torch.no_grad()
    def _likelihood(self, outputs: dict) -> dict[str, float]:
        if "z" not in outputs:
            return {}
        log_prob, dims = 0.0, 0
        for z, log_det in zip(outputs["z"], outputs["log_det"]):
            d = z[0].numel()
            log_prob += float((-0.5 * z.square().sum(dim=(1, 2, 3)) - 0.5 * d * math.log(2 * math.pi) + log_det).mean())
            dims += d
        per_dim = log_prob / dims
        return {"log_likelihood_per_dim": per_dim, "bits_per_dim": -per_dim / math.log(2)}

    def compute_train_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._likelihood(outputs)

    def compute_valid_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._likelihood(outputs)
