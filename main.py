"""Runs the framework's command line from a checkout: ``python main.py --help``.

The code lives in the package ``anomaly_framework/`` (its ``cli`` module); this file only lets the
README's commands work from the repository root without an install.
"""
import sys

from anomaly_framework.cli import main

if __name__ == "__main__":
    sys.exit(main())
