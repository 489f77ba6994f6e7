"""Checkpoint files: the run's file name, a read that names a truncated or foreign file in one line, and
an atomic write whose failure (a full disk) is one line too."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from anomaly_framework.errors import FrameworkError

CHECKPOINT_NAME = "checkpoint.pt"


def read_checkpoint(path: Path, device: torch.device | str, needs: tuple[str, ...] = ("model",)) -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint, or one line naming the file when it is truncated,
    empty, not a checkpoint, or lacks one of ``needs``."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as error:
        size = path.stat().st_size if path.is_file() else 0
        raise FrameworkError(f"'{path}' ({size:,} bytes) is not a readable checkpoint (truncated, empty or another "
                             f"file; an interrupted copy?): {str(error).splitlines()[0] if str(error) else ''}"
                             .rstrip(": ")) from error
    missing = [key for key in needs if not isinstance(state, dict) or key not in state]
    if missing:
        raise FrameworkError(f"'{path}' is not a checkpoint of this framework: it lacks {', '.join(missing)}")
    return state


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` through a temporary file, so that Ctrl-C or a full disk never leaves a truncated file;
    a write that fails (a full disk) is a one-line error naming the file. Written through a Python file,
    whose failure is the operating system's OSError (torch's own writer reports an assertion instead)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except OSError as error:
        raise FrameworkError(f"Cannot write '{path}': {error.strerror or error} (free some disk space, or set "
                             f"output_dir elsewhere)") from error
    finally:
        temporary.unlink(missing_ok=True)
