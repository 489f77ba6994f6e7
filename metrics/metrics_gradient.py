"""Family metrics of the gradient-trained models: PSNR and SSIM of reconstructions during training.

Computed on de-normalised images in [0, 1] (data range 1), per image then averaged. LPIPS is not
reported yet: it needs AlexNet ImageNet weights, which the framework does not fabricate.
"""
from __future__ import annotations

import torch

from metrics.ssim import psnr, ssim
from registry import METRICS_REGISTRY
from utils import denormalize


@METRICS_REGISTRY.register("gradient")
class GradientMetrics:
    """PSNR / SSIM of ``outputs["reconstruction"]`` against the batch's images; {} for other models."""

    def __init__(self, config: dict) -> None:
        self.normalize = config["data"]["normalize"]

    @torch.no_grad()
    def _reconstruction_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        if "reconstruction" not in outputs:
            return {}
        target = denormalize(batch["image"].to(outputs["reconstruction"].device), self.normalize)
        prediction = denormalize(outputs["reconstruction"].detach().float(), self.normalize)
        return {"psnr": float(psnr(prediction, target, 1.0).mean()), "ssim": float(ssim(prediction, target, 1.0))}

    def compute_train_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._reconstruction_metrics(outputs, batch)

    def compute_valid_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._reconstruction_metrics(outputs, batch)
