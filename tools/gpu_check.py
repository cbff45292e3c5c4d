"""GPU smoke check (``make gpu-check``): train and test the tiny configs on CUDA with AMP/bf16,
run the CUDA tests and, with two GPUs, one dist_train.sh run. See flora_mm/harness/gpu_check.py.

Runs ``flora_mm.cli.gpu_check`` from a checkout; with flora_mm installed, the same is
    python -m flora_mm.cli.gpu_check ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from flora_mm.cli.gpu_check import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
