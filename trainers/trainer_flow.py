"""The trainer of normalizing-flow models (FastFlow): the gradient trainer's machinery, full batches only.

FastFlow's reference drops the last incomplete batch, whose noisier log-likelihood estimate would
otherwise weigh as much as a full one.
"""
from __future__ import annotations

from registry import TRAINER_REGISTRY
from trainers.trainer_gradient import GradientTrainer


@TRAINER_REGISTRY.register("flow")
class FlowTrainer(GradientTrainer):
    """Early stopping on held-out normal images' loss, resume and NaN guard, as the gradient trainer."""

    drop_last = True
