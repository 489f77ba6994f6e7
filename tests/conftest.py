"""Shared pytest setup: the repository root is the import root."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """One generated demo dataset shared by every test of the session."""
    from dataloaders.dataloader_demo import ensure_demo

    root = tmp_path_factory.mktemp("demo")
    ensure_demo(root, "fabric")
    return root


@pytest.fixture(scope="session")
def scores_auroc():
    """Image AUROC recomputed with scikit-learn from a run's scores.csv: a run's reported metric must equal it."""
    import csv

    from sklearn.metrics import roc_auc_score

    def compute(run_dir) -> float:
        with open(Path(run_dir) / "scores.csv") as handle:
            rows = list(csv.DictReader(handle))
        return float(roc_auc_score([int(r["label"]) for r in rows], [float(r["score"]) for r in rows]))

    return compute
