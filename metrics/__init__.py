"""Metrics: evaluation metrics shared by all models, and family metrics reported during training."""
