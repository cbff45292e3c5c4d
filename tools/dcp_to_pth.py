"""Write a sharded (DCP) checkpoint directory as one ordinary mmengine checkpoint file.

Runs ``flora_mm.cli.dcp_to_pth`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.dcp_to_pth ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.dcp_to_pth import main  # noqa: E402

if __name__ == '__main__':
    main()
