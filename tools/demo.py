"""The README demo: tiny data -> fine-tune with tools/train.py -> evaluate with tools/test.py.

Runs the real tools as a user would (one subprocess each) on the tiny configs and prints the
task metrics at the end: bbox/segm mAP (COCO), mIoU (ADE20K), mAP (DOTA).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    'coco': 'configs/coco/tiny/convnextv2_flora_r16.py',
    'ade20k': 'configs/ade20k/tiny/convnextv2_flora_r16.py',
    'dota': 'configs/dota/tiny/convnextv2_flora_r16.py',
}
METRICS = {
    'coco': ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'),
    'ade20k': ('mIoU', 'aAcc', 'mAcc'),
    'dota': ('dota/mAP',),
}


def run(cmd: list[str]) -> None:
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def last_checkpoint(work_dir: str) -> str:
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def test_metrics(work_dir: str) -> dict:
    """The metrics tools/test.py logged (mmengine writes them to <timestamp>/<timestamp>.json)."""
    logs = sorted(glob.glob(os.path.join(work_dir, '*', '*.json')), key=os.path.getmtime)
    if not logs:
        raise FileNotFoundError(f'no test log under {work_dir}')
    with open(logs[-1]) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--tasks', nargs='+', default=['coco'], choices=list(CONFIGS))
    parser.add_argument('--data-root', default='data/tiny')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    args = parser.parse_args()

    py = sys.executable
    start = time.time()
    run([py, 'tools/make_tiny_data.py', '--out', args.data_root, '--tasks', *args.tasks])
    results = {}
    for task in args.tasks:
        config = CONFIGS[task]
        train_dir = os.path.join(args.work_dir, task, 'train')
        test_dir = os.path.join(args.work_dir, task, 'test')
        run([py, 'tools/train.py', config, '--work-dir', train_dir])
        run([py, 'tools/test.py', config, last_checkpoint(train_dir), '--work-dir', test_dir])
        results[task] = test_metrics(test_dir)
    print(f'\nflora_mm demo: FLoRA r16 on tiny data, {time.time() - start:.0f} s')
    for task, metrics in results.items():
        shown = ', '.join(f'{k}={metrics[k]:.3f}' for k in METRICS[task] if k in metrics)
        print(f'  {task:7s} {CONFIGS[task]}: {shown}')


if __name__ == '__main__':
    main()
