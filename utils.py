"""Shared helpers: the framework's error type, seeding, device resolution and console reports."""
from __future__ import annotations


class FrameworkError(Exception):
    """A user-facing error: bad input, bad config or missing files. The CLI prints it as one line."""
