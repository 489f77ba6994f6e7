"""Measuring the framework against the machine's floors and its exported runtimes."""
