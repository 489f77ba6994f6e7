"""FastFlow's modeler: the flow's negative log-likelihood loss and the reference anomaly map."""
from __future__ import annotations

import torch

from anomaly_framework.modelers.modeler_base import BaseModeler
from anomaly_framework.registry import MODELER_REGISTRY


@MODELER_REGISTRY.register("fastflow")
class FastFlowModeler(BaseModeler):
    """Trains the LayerNorms and flows; the backbone stays frozen."""

    def compute_loss(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.model.loss(outputs)}

    def maps_from_outputs(self, outputs: dict, batch: dict) -> torch.Tensor:
        """At the input size (the configured one for batches of cached features)."""
        return self.model.anomaly_map(outputs, self.input_size(batch))
