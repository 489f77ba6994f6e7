"""Metrics: evaluation metrics shared by all models, and family metrics reported during training."""
from anomaly_framework.metrics import metrics_flow, metrics_gradient, metrics_memory  # noqa: F401
