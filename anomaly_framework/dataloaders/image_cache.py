"""The on-disk cache shared by every run: decoded, resized images (uint8) and frozen-backbone features.

A researcher runs many models, seeds and settings on the same images; each image is decoded and resized
once per preprocessing and read back memory-mapped afterwards, by any run, process or DataLoader worker.

Entries are keyed by the source file's resolved path, size and modification time (nanoseconds) plus
everything that shaped the stored array (the preprocessing, the backbone...). A stat is free where a
content hash would read every file in full on each run (the cost the cache removes, on network file
systems above all); editing or replacing a file changes its size or time, so an edited image is never
served stale. (A tool that rewrites an image keeping its size and its old time would defeat this, as it
defeats make and rsync; delete the cache folder then.) A moved or copied dataset is decoded again.

Writers save to a temporary file in the entry's folder and rename it into place, which is atomic: two
processes filling the same entry (a torchrun job, two terminals) each write a complete file and readers
only ever see complete ones. The folder only ever holds what can be recomputed: deleting it is safe.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from anomaly_framework.errors import FrameworkError

CACHE_ENV = "ANOMALY_FRAMEWORK_CACHE"


def default_cache_root() -> Path:
    """``$ANOMALY_FRAMEWORK_CACHE``, else ``$XDG_CACHE_HOME/anomaly_framework``, else ``~/.cache/anomaly_framework``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "anomaly_framework"


def cache_root(cache_dir: str | None) -> Path:
    """The configured ``data.cache_dir``, or the default root."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_root()


def file_key(path: Path, *parts: object) -> str:
    """A hex key of a source file (resolved path, size, modification time) and what was done to it."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise FrameworkError(f"Cannot read image '{path}': {error} (replace or remove the file)") from error
    text = "|".join(str(part) for part in (Path(path).resolve(), stat.st_size, stat.st_mtime_ns, *parts))
    return hashlib.sha1(text.encode()).hexdigest()


class ArrayStore:
    """Arrays saved as ``<folder>/<key[:2]>/<key>.npy``, read memory-mapped, written atomically.

    A folder that cannot be written (read-only home, full disk) is reported once and the store then
    only computes, so a run never fails because of its cache.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writable = True

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def read(self, key: str) -> np.ndarray | None:
        """The stored array (memory-mapped, read-only) or None if absent or unreadable."""
        try:
            return np.load(self.path(key), mmap_mode="r")
        except (OSError, ValueError, EOFError):  # absent, or cut short by a crash before the rename
            return None

    def write(self, key: str, array: np.ndarray) -> None:
        """Writes a complete temporary file beside the entry, then renames it into place."""
        if not self.writable:
            return
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{key}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    np.save(file, np.ascontiguousarray(array))
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            self.writable = False
            warnings.warn(f"Cache folder '{self.folder}' is not writable ({error}): computing without it "
                          f"(set data.cache_dir, or data.cache=false)")

    def get(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The stored array, else ``make()``'s, stored for next time."""
        array = self.read(key)
        if array is None:
            array = make()
            self.write(key, array)
        return array
