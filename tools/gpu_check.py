"""GPU smoke check (``make gpu-check``): train and test the tiny configs on CUDA with AMP/bf16,
run the CUDA tests and, with two GPUs, one dist_train.sh run. See flora_mm/harness/gpu_check.py.

    python tools/gpu_check.py [--work-dir work_dirs/gpu_check]
"""
import argparse
import os
import sys

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flora_mm.harness.gpu_check import run_gpu_check  # noqa: E402

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--work-dir', default='work_dirs/gpu_check')
    sys.exit(run_gpu_check(parser.parse_args().work_dir))
