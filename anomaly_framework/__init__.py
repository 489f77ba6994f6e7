"""The framework under one import name, so that it neither shadows nor is shadowed by a user's modules.

After ``pip install -e .`` the environment gains this one top-level name: ``from anomaly_framework.main
import run_experiment`` works from any folder, beside a user's own ``config.py`` or ``utils.py``. The
modules stay where the design puts them, in the repository root (``main.py``, ``config.py``,
``models/`` ...): this package's search path is that root, so ``anomaly_framework.models.model_padim``
is ``models/model_padim.py``.
"""
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if not (_ROOT / "main.py").is_file():
    raise ImportError(f"anomaly_framework expects its modules in {_ROOT}: install it with 'pip install -e <repository>'")
__path__ = [str(_ROOT)]
