"""``make gpu-check``: does flora_mm really train on this machine's GPUs?

Runs what a user would run, each step in its own subprocess so that one failure does not hide
the next: the mmcv CUDA kernel check, the three tasks' tiny configs trained and tested on CUDA with
AMP (and the InternViT one with a bf16 backbone under bf16 autocast), the CUDA-marked tests
(adapter equivalence in fp32 and bf16, mmcv's ops on CUDA against their CPU kernels) and, with two
or more GPUs, one 2-process torchrun training (what ``tools/dist_train.sh`` runs), and a short
benchmark in the paper's Table 4 layout (step time and peak memory of FLoRA, LoRA, DoRA and Full
against Floor; ConvNeXt-V2-tiny in fp32 and, memory permitting, -large at batch 2 under bf16
autocast). The tools run
as ``python -m flora_mm.cli.<tool>`` (:mod:`flora_mm.harness.launch`) in the source tree that
holds the configs and tests (the checkout flora_mm comes from, else the working folder). Prints a
one-screen summary and writes ``gpu_check.md`` (card, command, date, the steps and the benchmark
tables, ready for docs/performance.md) beside the benchmark JSON and PNG files; the exit status is
non-zero when any step failed or when there is no CUDA device at all.

``rehearse=True`` runs the same steps on the CPU (no AMP, the bf16 and large-model parts left
out, a smaller benchmark): a check of everything up to CUDA on a machine without a GPU, so that
a GPU machine's scarce minutes are not spent on a broken script.
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

#: the benchmark rows: the paper's Table 4 methods, with Floor and Full as the bounds
BENCH_METHODS = ('Floor', 'LoRA', 'DoRA', 'FLoRA', 'Full')
# (name, file stem, tools/benchmark.py arguments, GPU memory it needs in GiB: a "16 GB" card
# reports about 15.8 GiB)
BENCHMARKS: list[tuple[str, str, list[str], float]] = [
    ('benchmark ConvNeXt-V2-tiny fp32', 'bench_tiny',
     ['--arch', 'tiny', '--batch', '8', '--size', '224', '--rounds', '6'], 0.0),
    ('benchmark ConvNeXt-V2-large bf16', 'bench_large',
     ['--arch', 'large', '--batch', '2', '--size', '224', '--rounds', '6', '--bf16'], 15.0),
]
#: the CPU rehearsal's benchmark: the same code path, a size two cores finish in a minute or two
REHEARSAL_BENCH = ['--arch', 'atto', '--batch', '2', '--size', '64', '--rounds', '2',
                   '--warmup', '1']


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ''
    skipped: bool = False

    @property
    def status(self) -> str:
        return 'SKIP' if self.skipped else ('PASS' if self.ok else 'FAIL')


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
                    work_dir: str, amp: bool = True, env: dict | None = None
                    ) -> tuple[bool, str]:
    train_dir, test_dir = os.path.join(work_dir, 'train'), os.path.join(work_dir, 'test')
    opts = ['--cfg-options', *options] if options else []
    ok, detail = _run(tool_command('train', [config, *(['--amp'] if amp else []), '--work-dir',
                                             train_dir, *opts]),
                      os.path.join(work_dir, 'train.log'), env=env)
    if not ok:
        return False, 'train ' + detail
    with open(os.path.join(train_dir, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    ok, detail = _run(tool_command('test', [config, ckpt, '--work-dir', test_dir, *opts]),
                      os.path.join(work_dir, 'test.log'), env=env)
    if not ok:
        return False, 'test ' + detail
    found = _last_metrics(test_dir)
    values = {k: float(found[k]) for k in metrics if k in found}
    if len(values) != len(metrics) or not all(math.isfinite(v) for v in values.values()):
        return False, f'metrics missing or not finite: {values}'
    return True, ', '.join(f'{k}={v:.3f}' for k, v in values.items())


def _benchmark(args: list[str], stem: str, work_dir: str, env: dict | None = None
               ) -> tuple[bool, str]:
    """tools/benchmark.py with JSON and PNG beside the report; the detail names FLoRA's ratios."""
    json_path, png = (os.path.join(work_dir, f'{stem}.{ext}') for ext in ('json', 'png'))
    ok, detail = _run(tool_command('benchmark', [*args, '--methods', *BENCH_METHODS,
                                                 '--json', json_path, '--plot', png]),
                      os.path.join(work_dir, 'logs', f'{stem}.log'), env=env)
    if not ok:
        return False, detail
    with open(json_path) as f:
        rows = {r['method']: r for r in json.load(f)['rows']}
    return True, _flora_summary(rows['FLoRA'])


def _flora_summary(flora: dict) -> str:
    text = (f'FLoRA {flora["s_step"] * 1e3:.1f} ms/step = x{flora["x_Floor"]:.2f} Floor, '
            f'x{flora["x_LoRA"]:.2f} LoRA')
    if 'peak_mib' in flora:
        text += f'; peak {flora["peak_mib"]:.0f} MiB = x{flora["mem_x_Floor"]:.2f} Floor'
    return text


def _report(path: str, header: list[str], results: list[StepResult], work_dir: str,
            benchmarks: list[str]) -> None:
    """gpu_check.md: what ran where, each step, and the tables of ``benchmarks`` (the stems this
    run wrote) as tools/benchmark.py prints them (written to a .part file first)."""
    from .benchmark import BenchResult, format_table
    lines = ['# flora_mm gpu-check', '', *header, '', '| step | status | seconds | detail |',
             '| --- | --- | --- | --- |']
    for r in results:
        lines.append(f'| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace("|", "/")} |')
    for stem in benchmarks:
        with open(os.path.join(work_dir, f'{stem}.json')) as f:
            result = BenchResult(**json.load(f))
        # titled by what ran (a rehearsal runs a smaller model than the step's name says)
        lines += ['', f'## Benchmark ({stem}.json)', '', format_table(result), '',
                  f'![{stem}]({stem}.png)']
    with open(path + '.part', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(path + '.part', path)


def run_gpu_check(work_dir: str = 'work_dirs/gpu_check', rehearse: bool = False) -> int:
    """Run every step, print the summary, write gpu_check.md; returns the process exit status."""
    import torch
    work_dir = os.path.abspath(work_dir)
    print(f'flora_mm gpu-check{" (CPU rehearsal)" if rehearse else ""}: logs under {work_dir}',
          flush=True)
    if not rehearse and not torch.cuda.is_available():
        print('gpu-check: no CUDA device visible to torch '
              f'(torch {torch.__version__}, built for CUDA {torch.version.cuda}); nothing checked'
              ' (--rehearse-on-cpu runs the same steps on the CPU)')
        return 2
    root = find_checkout('configs', 'tests')
    if root is None:
        print('gpu-check: needs the source tree (its configs/ and tests/): run it in a checkout')
        return 2
    os.makedirs(os.path.join(work_dir, 'logs'), exist_ok=True)
    for _, stem, _, _ in BENCHMARKS:  # a reused folder: no earlier run's figures in the report
        for ext in ('json', 'png'):
            if os.path.exists(os.path.join(work_dir, f'{stem}.{ext}')):
                os.remove(os.path.join(work_dir, f'{stem}.{ext}'))
    # the rehearsal's children see no GPU either, also on a machine that has one
    child = {'CUDA_VISIBLE_DEVICES': ''} if rehearse else {}
    started = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    if rehearse:
        n_gpus, devices, gpu_gib = 0, 'CPU (rehearsal)', 0.0
    else:
        n_gpus = torch.cuda.device_count()
        devices = ', '.join(torch.cuda.get_device_name(i) for i in range(n_gpus))
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    results: list[StepResult] = []

    def kernels() -> tuple[bool, str]:
        from ..apis.cuda_ops import check_mmcv_cuda_kernels
        return True, check_mmcv_cuda_kernels()

    if rehearse:
        results.append(StepResult('mmcv CUDA kernels', True, 0.0, 'skipped: CPU rehearsal',
                                  skipped=True))
    else:
        results.append(_timed('mmcv CUDA kernels', kernels))
    data_root = os.path.join(root, 'data', 'tiny')
    results.append(_timed('tiny data', lambda: _run(
        tool_command('make_tiny_data', ['--out', data_root]),
        os.path.join(work_dir, 'logs', 'data.log'), env=child)))
    for i, (name, config, options, metrics) in enumerate(TRAIN_STEPS):
        if rehearse:  # fp32 on the CPU: AMP and the bf16 backbone are CUDA's
            name, options = name.split(' (')[0] + ' (CPU fp32)', []
        task_dir = os.path.join(work_dir, f'task{i}')
        results.append(_timed(name, lambda c=config, o=options, m=metrics, d=task_dir:
                              _train_and_test(c, o, m, d, amp=not rehearse, env=child)))
    results.append(_timed('pytest -m cuda', lambda: _run(
        [sys.executable, '-m', 'pytest', '-m', 'cuda', '-q', '-p', 'no:cacheprovider', 'tests'],
        os.path.join(work_dir, 'logs', 'pytest_cuda.log'), env=child)))
    if n_gpus >= 2:
        dist_env = dict(os.environ, PORT=os.environ.get('PORT', '29531'))
        results.append(_timed('torchrun train, 2 GPUs (coco tiny)', lambda: _run(
            tool_command('train', [TRAIN_STEPS[0][1], '--amp', '--work-dir',
                                   os.path.join(work_dir, 'dist')], gpus=2, env=dist_env),
            os.path.join(work_dir, 'logs', 'dist.log'), env=dist_env)))
    else:
        results.append(StepResult('torchrun train, 2 GPUs', True, 0.0,
                                  f'skipped: {n_gpus} GPU{"" if n_gpus == 1 else "s"}',
                                  skipped=True))
    benchmarks = []
    for name, stem, args, need_gib in BENCHMARKS:
        if rehearse:
            if '--bf16' in args:
                results.append(StepResult(name, True, 0.0, 'skipped: bf16 autocast is CUDA\'s',
                                          skipped=True))
                continue
            name, args = name + ' (CPU, atto)', [*REHEARSAL_BENCH, '--device', 'cpu']
        elif gpu_gib < need_gib:
            results.append(StepResult(name, True, 0.0, f'skipped: {gpu_gib:.0f} GiB GPU memory, '
                                      f'needs {need_gib:.0f}', skipped=True))
            continue
        else:
            args = [*args, '--device', 'cuda']
        results.append(_timed(name, lambda a=args, s=stem: _benchmark(a, s, work_dir, child)))
        if results[-1].ok:
            benchmarks.append(stem)

    machine = f'{n_gpus} x {devices}' if n_gpus else devices
    software = (f'torch {torch.__version__}, CUDA {torch.version.cuda}, Python '
                f'{sys.version.split()[0]}')
    header = [f'- machine: {machine}', f'- {software}',
              f'- command: `python -m flora_mm.cli.gpu_check --work-dir {work_dir}'
              f'{" --rehearse-on-cpu" if rehearse else ""}`, started {started}',
              f'- total {sum(r.seconds for r in results):.0f} s']
    print(f'\n== flora_mm gpu-check on {machine} ({software}) ==')
    for r in results:
        print(f'{r.status} {r.seconds:7.1f}s  {r.name:40s} {r.detail}')
    failed = [r.name for r in results if not r.ok]
    skipped = sum(r.skipped for r in results)
    print(f'gpu-check: {len(results) - len(failed) - skipped} steps passed, {len(failed)} failed, '
          f'{skipped} skipped; report {os.path.join(work_dir, "gpu_check.md")}')
    _report(os.path.join(work_dir, 'gpu_check.md'), header, results, work_dir, benchmarks)
    return 1 if failed else 0
