"""Modelers: one per model, registered by name in MODELER_REGISTRY."""
from anomaly_framework.modelers import (  # noqa: F401
    modeler_autoencoder, modeler_cflow, modeler_dfm, modeler_draem, modeler_fastflow, modeler_padim,
    modeler_patchcore, modeler_reverse_distillation, modeler_simplenet, modeler_stfpm, modeler_vae,
)
