"""The README demo: tiny data -> fine-tune with tools/train.py -> evaluate with tools/test.py.

Runs the real tools as a user would (one subprocess each) on the tiny configs and prints the
task metrics at the end: bbox/segm mAP (COCO), mIoU (ADE20K), mAP (DOTA)
(``flora_mm.apis.run_demo``).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's flora_mm

from flora_mm.apis.demo import DEMO_CONFIGS, run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--tasks', nargs='+', default=['coco'], choices=list(DEMO_CONFIGS))
    parser.add_argument('--data-root', default='data/tiny')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    args = parser.parse_args()
    run_demo(str(ROOT), tasks=args.tasks, data_root=args.data_root, work_dir=args.work_dir)


if __name__ == '__main__':
    main()
