"""BTAD / beanTech (Mishra et al., IEEE ISIE 2021): products 01, 02, 03.

<root>/<product>/train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png|.bmp (images .bmp or .png).
"""
from __future__ import annotations

from anomaly_framework.dataloaders.dataloader_base import BaseDataloader, Sample
from anomaly_framework.dataloaders.dataloader_mvtec import mvtec_samples
from anomaly_framework.registry import DATALOADER_REGISTRY
from anomaly_framework.errors import FrameworkError

BTAD_LAYOUT = "<root>/<01|02|03>/{train/ok, test/ok, test/ko, ground_truth/ko/<stem>.png|.bmp}"


@DATALOADER_REGISTRY.register("btad")
class BTADDataloader(BaseDataloader):
    """``ok`` is normal, ``ko`` anomalous; masks share their image's stem, in either format."""

    env_var = "BTAD_ROOT"
    known_categories = ("01", "02", "03")
    layout = BTAD_LAYOUT

    def list_samples(self) -> tuple[list[Sample], list[Sample]]:
        product_dir = self.root / str(self.category)
        if not product_dir.is_dir():
            known = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise FrameworkError(f"Unknown BTAD product '{self.category}': '{product_dir}' not found (here: {known})")
        return mvtec_samples(product_dir, normal="ok", mask_suffix="")
