"""Merge trained adapters into the base weights; write a checkpoint vanilla OpenMMLab code loads.

Runs ``flora_mm.cli.merge_adapters`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.merge_adapters ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.merge_adapters import main  # noqa: E402

if __name__ == '__main__':
    main()
