"""Measured peak host RSS per rank of sharded training at start, load and save.

Runs ``flora_mm.cli.measure_host_memory`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.measure_host_memory ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.measure_host_memory import main  # noqa: E402

if __name__ == '__main__':
    main()
