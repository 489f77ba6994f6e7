"""Family metrics of the gradient-trained models: PSNR, SSIM and LPIPS of reconstructions during training.

PSNR and SSIM are computed on de-normalised images in [0, 1] (data range 1), per image then averaged.
LPIPS (Zhang et al., CVPR 2018, AlexNet v0.1; see ``metrics/lpips.py``) is added to the validation
metrics only when its two weight files resolve (the weights folder or the torchvision hub); otherwise the
reason is warned once and kept in ``lpips_unavailable_reason``, and no number is reported.
"""
from __future__ import annotations

import warnings

import torch

from anomaly_framework.metrics.lpips import LPIPS, load_lpips, to_lpips_range
from anomaly_framework.metrics.ssim import psnr, ssim
from anomaly_framework.registry import METRICS_REGISTRY
from anomaly_framework.ops.normalize import denormalize


@METRICS_REGISTRY.register("gradient")
class GradientMetrics:
    """PSNR / SSIM (and LPIPS on validation) of ``outputs["reconstruction"]``; {} for other models."""

    def __init__(self, config: dict) -> None:
        self.normalize = config["data"]["normalize"]
        self.lpips_unavailable_reason: str | None = None
        self._lpips: LPIPS | None = None
        self._lpips_resolved = False

    def _lpips_model(self, device: torch.device) -> LPIPS | None:
        # Resolved on first use, so models without reconstructions never look for AlexNet weights.
        if not self._lpips_resolved:
            self._lpips_resolved = True
            self._lpips, message = load_lpips(device=device)
            if self._lpips is None:
                self.lpips_unavailable_reason = message
                warnings.warn(message, stacklevel=2)
        return self._lpips

    @torch.no_grad()
    def _reconstruction_metrics(self, outputs: dict, batch: dict, with_lpips: bool = False) -> dict[str, float]:
        if "reconstruction" not in outputs:
            return {}
        target = denormalize(batch["image"].to(outputs["reconstruction"].device), self.normalize)
        prediction = denormalize(outputs["reconstruction"].detach().float(), self.normalize)
        metrics = {"psnr": float(psnr(prediction, target, 1.0).mean()), "ssim": float(ssim(prediction, target, 1.0))}
        model = self._lpips_model(prediction.device) if with_lpips else None
        if model is not None:
            metrics["lpips"] = float(model(to_lpips_range(prediction), to_lpips_range(target)).mean())
        return metrics

    def compute_train_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._reconstruction_metrics(outputs, batch)

    def compute_valid_metrics(self, outputs: dict, batch: dict) -> dict[str, float]:
        return self._reconstruction_metrics(outputs, batch, with_lpips=True)
