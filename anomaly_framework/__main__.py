"""``python -m anomaly_framework ...``: the command line of ``anomaly_framework.cli``."""
import sys

from anomaly_framework.cli import main

sys.exit(main())
