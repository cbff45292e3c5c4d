"""GPU smoke check (``make gpu-check``): train and test the tiny configs on CUDA with AMP/bf16,
run the CUDA tests, with two GPUs one dist_train.sh run, and a short benchmark (Table 4 layout).
See flora_mm/harness/gpu_check.py.

    python tools/gpu_check.py [--work-dir work_dirs/gpu_check] [--rehearse-on-cpu]
"""
import argparse
import sys
from typing import Optional, Sequence

from flora_mm.harness.gpu_check import run_gpu_check


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--work-dir', default='work_dirs/gpu_check')
    parser.add_argument('--rehearse-on-cpu', action='store_true',
                        help='the same steps on the CPU, without AMP, bf16 or the large model: '
                             'checks everything up to CUDA on a machine without a GPU')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_gpu_check(args.work_dir, rehearse=args.rehearse_on_cpu)


if __name__ == '__main__':
    sys.exit(main())
