"""Pure nn.Module models, registered by name in MODEL_REGISTRY."""
from anomaly_framework.models import (  # noqa: F401
    model_ae, model_cflow, model_dfm, model_draem, model_fastflow, model_padim, model_patchcore,
    model_reverse_distillation, model_simplenet, model_stfpm, model_supersimplenet, model_vae,
)
