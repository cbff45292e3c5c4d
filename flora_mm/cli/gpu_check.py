"""GPU smoke check (``make gpu-check``): train and test the tiny configs on CUDA with AMP/bf16,
run the CUDA tests and, with two GPUs, one dist_train.sh run. See flora_mm/harness/gpu_check.py.

    python tools/gpu_check.py [--work-dir work_dirs/gpu_check]
"""
import argparse
import sys
from typing import Optional, Sequence

from flora_mm.harness.gpu_check import run_gpu_check


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--work-dir', default='work_dirs/gpu_check')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_gpu_check(parse_args(argv).work_dir)


if __name__ == '__main__':
    sys.exit(main())
