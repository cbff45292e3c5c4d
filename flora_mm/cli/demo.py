"""The README demo: tiny data -> fine-tune with tools/train.py -> evaluate with tools/test.py.

Runs the real tools as a user would (one subprocess each) on the tiny configs and prints the
task metrics at the end: bbox/segm mAP (COCO), mIoU (ADE20K), mAP (DOTA)
(``flora_mm.apis.run_demo``).
"""
import argparse
import sys
from typing import Optional, Sequence

from flora_mm.apis.demo import DEMO_CONFIGS, run_demo
from flora_mm.harness.launch import find_checkout


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--tasks', nargs='+', default=['coco'], choices=list(DEMO_CONFIGS))
    parser.add_argument('--data-root', default='data/tiny')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    # the demo runs the checkout's tools/ on its configs/: the checkout flora_mm comes from,
    # else the working folder
    root = find_checkout('configs', 'tools')
    if root is None:
        sys.exit('demo: error: run it in a checkout (it runs tools/*.py on configs/)')
    run_demo(root, tasks=args.tasks, data_root=args.data_root, work_dir=args.work_dir)


if __name__ == '__main__':
    main()
