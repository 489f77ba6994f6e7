"""Shared pytest setup: the repository root is the import root; caches live in a session folder.

The decoded-image and feature caches (``data.cache_dir``'s default), the generated demo data's default
root and every library cache honouring ``XDG_CACHE_HOME`` point into one temporary folder, so the suite
never writes to the user's home and every test starts from the same empty cache.
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SESSION_CACHE = Path(tempfile.mkdtemp(prefix="anomaly_framework_tests_"))
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)
os.environ["ANOMALY_FRAMEWORK_CACHE"] = str(SESSION_CACHE / "anomaly_framework")
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE / "xdg")
os.environ.setdefault("MPLCONFIGDIR", str(SESSION_CACHE / "matplotlib"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """One generated demo dataset shared by every test of the session."""
    from anomaly_framework.dataloaders.dataloader_demo import ensure_demo

    root = tmp_path_factory.mktemp("demo")
    ensure_demo(root, "fabric")
    return root


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(n)`` makes the gradient trainer raise KeyboardInterrupt (what Ctrl-C raises) as
    its n-th training epoch starts; ``interrupt_training(None)`` lets it train normally again."""
    from anomaly_framework.trainers.trainer_gradient import GradientTrainer

    original = GradientTrainer.run_epoch

    def at(epoch: int | None) -> None:
        calls = {"train": 0}

        def run_epoch(self, loader, number, num_epochs, mode):
            calls["train"] += mode == "train"
            if mode == "train" and calls["train"] == epoch:
                raise KeyboardInterrupt
            return original(self, loader, number, num_epochs, mode)

        monkeypatch.setattr(GradientTrainer, "run_epoch", original if epoch is None else run_epoch)

    return at


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
