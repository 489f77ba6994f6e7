"""Ctrl-C during a run: the run stops at the next batch, cleanly, and says where; never a traceback.

Python's own handling raises KeyboardInterrupt wherever the main process happens to be. Inside an at-fork
hook (a DataLoader starting its workers), a ``__del__`` or a half-built DataLoader iterator, it is printed
as an ignored exception with its traceback and the run goes on; the DataLoader workers, which get the
terminal's SIGINT too, stop on their own and the main process then fails on a vanished worker. While
``ctrl_c_stops_at_next_batch`` is active, the first Ctrl-C only records the request and every batch loop
of the trainers calls ``raise_if_interrupted``; a second Ctrl-C raises at once (not under ``torchrun``,
whose launcher passes the terminal's Ctrl-C on to every rank again); forked workers ignore it (the main
process shuts them down).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

_state = {"owner": None, "requested": False}


def _on_sigint(signum, frame) -> None:
    if os.getpid() != _state["owner"]:  # a forked DataLoader worker inherits this handler
        return
    if _state["requested"]:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun forwards the terminal's Ctrl-C: the same press
            return
        _state["requested"] = False
        raise KeyboardInterrupt
    _state["requested"] = True
    print("\nCtrl-C: stopping at the next batch (press it again to stop at once)", file=sys.stderr, flush=True)


def raise_if_interrupted() -> None:
    """Raises KeyboardInterrupt once a Ctrl-C has been requested (called between batches). A background
    thread (a split's features computed ahead) stops too but leaves the request for the main thread."""
    if _state["requested"]:
        if threading.current_thread() is threading.main_thread():
            _state["requested"] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_stops_at_next_batch() -> Iterator[None]:
    """Installs the handler for the duration of a run, in the main thread and only where Ctrl-C has its
    default meaning (a process started with SIGINT ignored, or a host with its own handler, keeps it).

    A Ctrl-C that came after the last batch loop is raised when the run ends, so a sweep still stops."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _state.update(owner=os.getpid(), requested=False)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _state["requested"]:
        _state["requested"] = False
        raise KeyboardInterrupt("Ctrl-C came as the run finished: its results are complete")
