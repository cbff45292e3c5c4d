"""Generate the tiny COCO / ADE20K / DOTA datasets (real on-disk formats) under --out.

Runs ``flora_mm.cli.make_tiny_data`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.make_tiny_data ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.make_tiny_data import main  # noqa: E402

if __name__ == '__main__':
    main()
