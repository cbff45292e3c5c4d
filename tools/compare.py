"""Compare PEFT methods at matched parameter budgets (the paper's Table 1 / Table 2 / Fig. 2).

Runs ``flora_mm.cli.compare`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.compare ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.compare import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
