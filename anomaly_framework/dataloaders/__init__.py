"""Dataset readers, registered by name in DATALOADER_REGISTRY."""
from anomaly_framework.dataloaders import dataloader_btad, dataloader_demo, dataloader_folder, dataloader_mvtec, dataloader_visa  # noqa: F401
