"""Count total and trainable parameters of a config's model (the paper's "# Params").

Runs ``flora_mm.cli.count_params`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.count_params ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.count_params import main  # noqa: E402

if __name__ == '__main__':
    main()
