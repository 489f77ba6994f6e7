"""Trainers: one per model family, registered in TRAINER_REGISTRY."""
from anomaly_framework.trainers import trainer_classification, trainer_flow, trainer_gradient, trainer_memory  # noqa: F401
