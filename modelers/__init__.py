"""Modelers: one per model, registered by name in MODELER_REGISTRY."""
from modelers import modeler_autoencoder, modeler_draem, modeler_fastflow, modeler_padim, modeler_patchcore, modeler_stfpm  # noqa: F401
