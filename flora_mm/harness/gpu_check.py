"""``make gpu-check``: does flora_mm really train on this machine's GPUs?

Runs what a user would run, each step in its own subprocess so that one failure does not hide
the next: the mmcv CUDA kernel check, the three tasks' tiny configs trained and tested on CUDA with
AMP (and the InternViT one with a bf16 backbone under bf16 autocast), the CUDA-marked tests
(adapter equivalence in fp32 and bf16, mmcv's ops on CUDA against their CPU kernels) and, with two
or more GPUs, one 2-process torchrun training (what ``tools/dist_train.sh`` runs). The tools run
as ``python -m flora_mm.cli.<tool>`` (:mod:`flora_mm.harness.launch`) in the source tree that
holds the configs and tests (the checkout flora_mm comes from, else the working folder). Prints a
one-screen summary; the exit status is non-zero when any step failed or when there is no CUDA
device at all.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from .launch import child_env, find_checkout, tool_command

# (name, tiny config, extra --cfg-options, metric keys); AMP comes from train.py's --amp
TRAIN_STEPS: list[tuple[str, str, list[str], tuple[str, ...]]] = [
    ('coco Mask R-CNN (AMP fp16)', 'configs/coco/tiny/convnextv2_flora_r16.py', [],
     ('coco/bbox_mAP', 'coco/segm_mAP')),
    ('ade20k UperNet ConvNeXt-V2 (AMP fp16)', 'configs/ade20k/tiny/convnextv2_flora_r16.py', [],
     ('mIoU',)),
    ('ade20k UperNet InternViT (bf16)', 'configs/ade20k/tiny/internvit6b_flora_r16.py',
     ['model.backbone.backbone.dtype=bfloat16', 'optim_wrapper.dtype=bfloat16'], ('mIoU',)),
    ('dota Oriented R-CNN (AMP fp16)', 'configs/dota/tiny/convnextv2_flora_r16.py', [],
     ('dota/mAP',)),
]


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ''
    skipped: bool = False


def _run(cmd: list[str], log_path: str, env: dict | None = None,
         root: str | None = None) -> tuple[bool, str]:
    """Run ``cmd`` in the checkout ``root``, output to ``log_path``; (ok, last lines on
    failure)."""
    root = root or find_checkout('configs', 'tests') or os.getcwd()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, 'w') as log:
        proc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                              env=child_env({**os.environ, **(env or {})}, root))
    if proc.returncode == 0:
        return True, ''
    with open(log_path) as log:
        tail = log.read().splitlines()[-3:]
    return False, f'exit {proc.returncode}: ' + ' | '.join(t.strip() for t in tail)


def _last_metrics(work_dir: str) -> dict:
    """The metrics tools/test.py wrote (mmengine: <work_dir>/<timestamp>/<timestamp>.json)."""
    logs = sorted(glob.glob(os.path.join(work_dir, '*', '*.json')), key=os.path.getmtime)
    if not logs:
        raise FileNotFoundError(f'no metrics json under {work_dir}')
    with open(logs[-1]) as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def _timed(name: str, fn) -> StepResult:
    start = time.time()
    try:
        ok, detail = fn()
    except Exception as err:  # a step's own failure is reported, the next step still runs
        ok, detail = False, f'{type(err).__name__}: {err}'
    return StepResult(name, ok, time.time() - start, detail)


def _train_and_test(config: str, options: list[str], metrics: tuple[str, ...],
                    work_dir: str) -> tuple[bool, str]:
    train_dir, test_dir = os.path.join(work_dir, 'train'), os.path.join(work_dir, 'test')
    opts = ['--cfg-options', *options] if options else []
    ok, detail = _run(tool_command('train', [config, '--amp', '--work-dir', train_dir, *opts]),
                      os.path.join(work_dir, 'train.log'))
    if not ok:
        return False, 'train ' + detail
    with open(os.path.join(train_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    ok, detail = _run(tool_command('test', [config, ckpt, '--work-dir', test_dir, *opts]),
                      os.path.join(work_dir, 'test.log'))
    if not ok:
        return False, 'test ' + detail
    found = _last_metrics(test_dir)
    values = {k: float(found[k]) for k in metrics if k in found}
    if len(values) != len(metrics) or not all(math.isfinite(v) for v in values.values()):
        return False, f'metrics missing or not finite: {values}'
    return True, ', '.join(f'{k}={v:.3f}' for k, v in values.items())


def run_gpu_check(work_dir: str = 'work_dirs/gpu_check') -> int:
    """Run every step, print the summary; returns the process exit status."""
    import torch
    work_dir = os.path.abspath(work_dir)
    print(f'flora_mm gpu-check: logs under {work_dir}', flush=True)
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA device visible to torch '
              f'(torch {torch.__version__}, built for CUDA {torch.version.cuda}); nothing checked')
        return 2
    root = find_checkout('configs', 'tests')
    if root is None:
        print('gpu-check: needs the source tree (its configs/ and tests/): run it in a checkout')
        return 2
    n_gpus = torch.cuda.device_count()
    devices = ', '.join(torch.cuda.get_device_name(i) for i in range(n_gpus))
    results: list[StepResult] = []

    def kernels() -> tuple[bool, str]:
        from ..apis.cuda_ops import check_mmcv_cuda_kernels
        return True, check_mmcv_cuda_kernels()

    results.append(_timed('mmcv CUDA kernels', kernels))
    data_root = os.path.join(root, 'data', 'tiny')
    results.append(_timed('tiny data', lambda: _run(
        tool_command('make_tiny_data', ['--out', data_root]),
        os.path.join(work_dir, 'data.log'))))
    for i, (name, config, options, metrics) in enumerate(TRAIN_STEPS):
        task_dir = os.path.join(work_dir, f'task{i}')
        results.append(_timed(name, lambda c=config, o=options, m=metrics, d=task_dir:
                              _train_and_test(c, o, m, d)))
    results.append(_timed('pytest -m cuda', lambda: _run(
        [sys.executable, '-m', 'pytest', '-m', 'cuda', '-q', 'tests'],
        os.path.join(work_dir, 'pytest_cuda.log'))))
    if n_gpus >= 2:
        dist_env = dict(os.environ, PORT=os.environ.get('PORT', '29531'))
        results.append(_timed('torchrun train, 2 GPUs (coco tiny)', lambda: _run(
            tool_command('train', [TRAIN_STEPS[0][1], '--amp', '--work-dir',
                                   os.path.join(work_dir, 'dist')], gpus=2, env=dist_env),
            os.path.join(work_dir, 'dist.log'), env=dist_env)))
    else:
        results.append(StepResult('torchrun train, 2 GPUs', True, 0.0, 'skipped: only 1 GPU',
                                  skipped=True))

    print(f'\n== flora_mm gpu-check on {n_gpus} x {devices} (torch {torch.__version__}, '
          f'CUDA {torch.version.cuda}) ==')
    for r in results:
        status = 'SKIP' if r.skipped else ('PASS' if r.ok else 'FAIL')
        print(f'{status} {r.seconds:7.1f}s  {r.name:40s} {r.detail}')
    failed = [r.name for r in results if not r.ok]
    skipped = sum(r.skipped for r in results)
    print(f'gpu-check: {len(results) - len(failed) - skipped} steps passed, {len(failed)} failed, '
          f'{skipped} skipped')
    return 1 if failed else 0
