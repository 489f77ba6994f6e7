"""Batches in order with their items decoded by a thread pool ahead of the consumer.

With ``data.num_workers`` 0 (the default on one or two cores, where worker processes only copy) the
DataLoader decodes each batch on the critical path: the backbone waits for PNG decoding and resizing.
Pillow releases the GIL while it decodes, resizes and encodes, so threads decode the next batches
while the main thread runs the model, at no process start-up or copy cost. Items and their collation
are those of a DataLoader over the same dataset (``default_collate``), so the batches are identical;
no random state is drawn, so use it where the order is fixed and items are deterministic (the frozen
backbone's feature passes).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from torch.utils.data import Dataset, default_collate

# Batches decoded ahead of the one being consumed.
PREFETCH_BATCHES = 2


def decode_threads() -> int:
    """Threads decoding beside the model: the cores this process may use (at least 2, so decoding overlaps)."""
    return max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ThreadedLoader:
    """Iterates ``dataset`` in order in batches of ``batch_size``, ``PREFETCH_BATCHES`` batches ahead."""

    num_workers = 0

    def __init__(self, dataset: Dataset, batch_size: int, threads: int | None = None) -> None:
        self.dataset, self.batch_size, self.threads = dataset, batch_size, threads or decode_threads()

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator:
        starts = iter(range(0, len(self.dataset), self.batch_size))
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        pending: deque[list[Future]] = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                stop = min(start + self.batch_size, len(self.dataset))
                pending.append([pool.submit(self.dataset.__getitem__, index) for index in range(start, stop)])

        try:
            for _ in range(PREFETCH_BATCHES + 1):
                submit_next()
            while pending:
                items = [future.result() for future in pending.popleft()]
                submit_next()
                yield default_collate(items)
        finally:  # a consumer that stops early (Ctrl-C, an error) leaves no decoding behind
            pool.shutdown(wait=True, cancel_futures=True)
