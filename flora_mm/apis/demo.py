"""The README demo: tiny data -> fine-tune with tools/train.py -> evaluate with tools/test.py.

The tools run as a user would run them (one subprocess each, from a checkout), so the demo
shows the command-line path end to end; it prints the task metrics at the end.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..datasets.checkpoints import generate_checkpoints
from ..datasets.tiny import DEFAULT_ROOT, TASKS, generate

DEMO_CONFIGS = {
    'coco': 'configs/coco/tiny/convnextv2_flora_r16.py',
    'ade20k': 'configs/ade20k/tiny/convnextv2_flora_r16.py',
    'dota': 'configs/dota/tiny/convnextv2_flora_r16.py',
}
DEMO_METRICS = {
    'coco': ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'),
    'ade20k': ('mIoU', 'aAcc', 'mAcc'),
    'dota': ('dota/mAP',),
}


def make_tiny_data(out: str = DEFAULT_ROOT, tasks: Sequence[str] = TASKS, seed: int = 0,
                   num_train: int = 24, num_val: int = 8,
                   checkpoints: bool = True) -> dict[str, Path]:
    """The tiny datasets of ``tasks`` under ``out`` and (unless ``checkpoints=False``) the
    stand-in pretrained backbones the tiny configs load; returns {name: path written}."""
    written = dict(generate(out, tasks=tasks, seed=seed, num_train=num_train,
                            num_val=num_val))
    if checkpoints:
        written.update(generate_checkpoints(out, seed=seed))
    return written


def _run(cmd: list[str], root: str) -> None:
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, cwd=root, check=True)


def _last_checkpoint(work_dir: str) -> str:
    with open(os.path.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def logged_test_metrics(work_dir: str) -> dict:
    """The metrics tools/test.py logged (mmengine writes them to <timestamp>/<timestamp>.json)."""
    logs = sorted(glob.glob(os.path.join(work_dir, '*', '*.json')), key=os.path.getmtime)
    if not logs:
        raise FileNotFoundError(f'no test log under {work_dir}')
    with open(logs[-1]) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1]


def run_demo(root: str, tasks: Sequence[str] = ('coco',), data_root: str = DEFAULT_ROOT,
             work_dir: str = 'work_dirs/demo') -> dict[str, dict]:
    """Run the demo from the checkout ``root`` (it holds tools/ and configs/); returns and
    prints {task: test metrics}."""
    py = sys.executable
    start = time.time()
    _run([py, 'tools/make_tiny_data.py', '--out', data_root, '--tasks', *tasks], root)
    results = {}
    for task in tasks:
        train_dir = os.path.join(work_dir, task, 'train')
        test_dir = os.path.join(work_dir, task, 'test')
        config = DEMO_CONFIGS[task]
        _run([py, 'tools/train.py', config, '--work-dir', train_dir], root)
        _run([py, 'tools/test.py', config, _last_checkpoint(os.path.join(root, train_dir)),
              '--work-dir', test_dir], root)
        results[task] = logged_test_metrics(os.path.join(root, test_dir))
    print(f'\nflora_mm demo: FLoRA r16 on tiny data, {time.time() - start:.0f} s')
    for task, metrics in results.items():
        shown = ', '.join(f'{k}={metrics[k]:.3f}' for k in DEMO_METRICS[task] if k in metrics)
        print(f'  {task:7s} {DEMO_CONFIGS[task]}: {shown}')
    return results
