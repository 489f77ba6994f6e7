"""Pure nn.Module models, registered by name in MODEL_REGISTRY."""
from anomaly_framework.models import model_ae, model_draem, model_fastflow, model_padim, model_patchcore, model_stfpm, model_vae  # noqa: F401
from anomaly_framework.models import model_cflow  # noqa: F401
