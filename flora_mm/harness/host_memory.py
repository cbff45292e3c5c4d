"""Measured peak host RSS per rank of sharded training: start, load, save (issue 24 item 4).

    python tools/measure_host_memory.py --out work_dirs/host_memory [--procs 2]
        [--methods flora full] [--starts gathered meta] [--save-formats full dcp]
        [--embed-dim 1536 --depth 14 --num-heads 16] [--dtype bfloat16]

For a mid-size InternViT (``--embed-dim/--depth/--num-heads``, default ~0.43 B parameters,
weights stored in bf16 as InternVL's release) it writes the pretrained file in InternVL's
layout (``flora_mm.datasets.checkpoints.write_internvit_checkpoint``) and the tiny ADE20K
data, then trains the tiny InternViT ADE20K config + configs/_base_/fsdp.py scaled to that
model (``--cfg-options``-style overrides in a generated config) with tools/dist_train.sh's
command on ``--procs`` gloo processes, once per (method, start, save format): run 1 starts,
trains one iteration and saves (``iter_1``), run 2 resumes from it (``load``), trains one more
and saves again. ``FSDPRunner`` records each rank's phases
(``<work_dir>/<timestamp>/host_memory_rank<R>.json``); this harness collects them with each
rank's shard (weights + gradients + optimizer state, counted on the live model at the save)
into ``host_memory.json`` and ``host_memory.md`` under ``--out``, with the projection of
:mod:`flora_mm.apis.host_memory` for the same sizes and its error.

The runs go one at a time; before each, the harness waits (``--wait-s``) until the machine has
``--min-available-gib`` available, else stops with an error.

The save format is a config option: ``full`` passes nothing (the gathered single file);
``dcp`` passes ``<--save-format-option>=dcp`` (default ``model_wrapper_cfg.save_format``)
and checks that the run wrote a DCP directory.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import time
from typing import Optional, Sequence

from .launch import child_env, find_checkout, free_port, tool_command

METHODS = ('flora', 'full')
STARTS = ('gathered', 'meta')
SAVE_FORMATS = ('full', 'dcp')
TINY = 'configs/ade20k/tiny/internvit6b_flora_r16.py'
FRAGMENT = 'configs/_base_/fsdp.py'
GIB = 2 ** 30
MIB = 2 ** 20


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where it is missing)."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for_memory(min_bytes: int, wait_s: float, poll_s: float = 10.0) -> int:
    available = mem_available()
    deadline = time.monotonic() + wait_s
    while available < min_bytes and time.monotonic() < deadline:
        time.sleep(poll_s)
        available = mem_available()
    if available < min_bytes:
        raise RuntimeError(f'host memory: {available / GIB:.1f} GiB available, the run needs '
                           f'{min_bytes / GIB:.1f} GiB (--min-available-gib); not started')
    return available


def arch_dict(embed_dim: int, depth: int, num_heads: int) -> dict:
    if min(embed_dim, depth, num_heads) < 1 or embed_dim % num_heads:
        raise ValueError(f'InternViT size: embed_dim ({embed_dim}) must be a multiple of '
                         f'num_heads ({num_heads}), all >= 1, depth >= 1 ({depth})')
    if depth < 4:
        raise ValueError(f'depth must be >= 4 (four output levels), got {depth}')
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)


def config_text(root: str, method: str, meta_init: bool, arch: dict, dtype: str,
                pretrained: str) -> str:
    """The tiny InternViT ADE20K FSDP config scaled to ``arch`` (a generated leaf config)."""
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    d, depth = arch['embed_dim'], arch['depth']
    out = tuple(depth * (i + 1) // 4 - 1 for i in range(4))
    peft = "peft=dict(_delete_=True, type='Full'), " if method == 'full' else ''
    return (
        f"_base_ = [{osp.join(root, TINY)!r}, {osp.join(root, FRAGMENT)!r}]\n"
        f"model = dict(backbone=dict({peft}backbone=dict(arch=dict(_delete_=True, **{arch!r}), "
        f"dtype={dtype!r}, "
        f"out_indices={out!r}, init_cfg=dict(type='Pretrained', checkpoint={pretrained!r}))),\n"
        f"             decode_head=dict(in_channels=[{d}] * 4),\n"
        f"             auxiliary_head=dict(in_channels={d}))\n"
        f"model_wrapper_cfg = dict(meta_init={bool(meta_init)!r})\n"
        f"optim_wrapper = dict(paramwise_cfg=dict(num_layers={depth}))\n")


def _train_options(iters: int, extra: Sequence[str]) -> list[str]:
    return ['--cfg-options', 'train_dataloader.batch_size=2', f'train_cfg.max_iters={iters}',
            'train_cfg.val_interval=1000', 'default_hooks.checkpoint.interval=1',
            'default_hooks.logger.interval=1', 'val_cfg=None', 'val_dataloader=None',
            'val_evaluator=None', *extra]


def read_phases(work_dir: str, procs: int) -> list[list[dict]]:
    """Each rank's phase records of the newest run under ``work_dir``."""
    stamps = sorted(d for d in glob.glob(osp.join(work_dir, '*'))
                    if osp.isfile(osp.join(d, 'host_memory_rank0.json')))
    if not stamps:
        raise FileNotFoundError(f'no <timestamp>/host_memory_rank0.json under {work_dir}')
    out = []
    for rank in range(procs):
        with open(osp.join(stamps[-1], f'host_memory_rank{rank}.json'), encoding='utf-8') as f:
            out.append(json.load(f))
    return out


def _phase(records: list[dict], name: str, nth: int = 0) -> Optional[dict]:
    found = [r for r in records if r['phase'] == name]
    return found[nth] if len(found) > nth else None


def run_variant(root: str, cwd: str, python: str, procs: int, method: str, start: str,
                save_format: str, arch: dict, dtype: str, pretrained: str,
                save_format_option: str, with_load: bool, min_available: int, wait_s: float,
                timeout_s: float, log=print) -> dict:
    """Run 1 (start, 1 iteration, save) and, ``with_load``, run 2 (resume, 1 iteration, save)
    of one variant; the ranks' phase records of both."""
    tag = f"{method}_{start}_{save_format}_d{arch['embed_dim']}x{arch['depth']}_{dtype}"
    config = osp.join(cwd, f'{tag}.py')
    with open(config, 'w', encoding='utf-8') as f:
        f.write(config_text(root, method, start == 'meta', arch, dtype, pretrained))
    work = osp.join(cwd, 'work', tag)
    extra = [f'{save_format_option}=dcp'] if save_format == 'dcp' else []
    result = dict(method=method, start=start, save_format=save_format, config=config,
                  work_dir=work, runs=[])
    for number, (iters, resume) in enumerate(((1, False), (2, True))[:1 + int(with_load)]):
        available = wait_for_memory(min_available, wait_s)
        env = child_env(dict(os.environ, OMP_NUM_THREADS='1', PORT=str(free_port()),
                             PYTHON=python), cwd=cwd)
        args = [config, '--work-dir', work] + (['--resume'] if resume else []) + \
            _train_options(iters, extra)
        cmd = tool_command('train', args, python=python, gpus=procs, env=env)
        log(f'[host_memory] {tag} run {number + 1}: {available / GIB:.1f} GiB available; '
            + ' '.join(cmd))
        began = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        with open(osp.join(cwd, f'{tag}_run{number + 1}.log'), 'w', encoding='utf-8') as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f'{tag} run {number + 1} failed (rc {proc.returncode}); log '
                               f'{tag}_run{number + 1}.log:\n{(proc.stdout + proc.stderr)[-3000:]}')
        if save_format == 'dcp':
            from ..checkpoint import is_dcp_checkpoint
            ckpt = osp.join(work, f'iter_{iters}.pth')
            if not is_dcp_checkpoint(ckpt):
                raise RuntimeError(f'{tag}: {save_format_option}=dcp did not write a DCP '
                                   f'checkpoint ({ckpt}); is the option named differently? '
                                   '(--save-format-option)')
        result['runs'].append(dict(iters=iters, resume=resume, seconds=round(
            time.monotonic() - began, 1), ranks=read_phases(work, procs)))
    return result


def summarise(result: dict) -> list[dict]:
    """One row per rank: peak RSS (MiB) at start, load, save and the rank's shard (MiB)."""
    first = result['runs'][0]['ranks']
    second = result['runs'][1]['ranks'] if len(result['runs']) > 1 else None
    rows = []
    for rank, records in enumerate(first):
        start, save = _phase(records, 'start'), _phase(records, 'save')
        load = _phase(second[rank], 'load') if second else None
        shard = save['shard_bytes']
        rows.append(dict(
            model=_model_name(result), method=result['method'], start_scheme=result['start'],
            save_format=result['save_format'], rank=rank,
            start_mib=start['peak_rss_mib'], load_mib=load['peak_rss_mib'] if load else None,
            save_mib=save['peak_rss_mib'], resettable=all(r['resettable'] for r in records),
            shard_mib=round(sum(shard.values()) / MIB, 1),
            shard_parts_mib={k: round(v / MIB, 1) for k, v in shard.items()}))
    return rows


def projection_check(results: list[dict], cwd: str) -> list[dict]:
    """The projection of :mod:`flora_mm.apis.host_memory` (shards on the CPU, as measured;
    process overhead: this process's RSS after building the model, as tools/estimate_memory.py
    takes it) against each measured rank: start and save peaks, and the save's own increment
    (save peak - RSS when the save began, which on the CPU also holds what training left
    in the heap). MiB; error = projected - measured."""
    from mmengine.config import Config

    from ..apis.host_memory import config_host_sizes, host_peaks, process_overhead
    from ..apis.memory import build_meta_model
    rows, here = [], os.getcwd()
    for result in results:
        if not osp.isfile(result['config']):
            continue  # measured into another folder (a copied report): no sizes to check
        os.chdir(cwd)  # the generated config's data paths are relative to it
        try:
            cfg = Config.fromfile(result['config'])
            model = build_meta_model(cfg)
            sizes = config_host_sizes(cfg, result['procs'], model=model)
            del model
        finally:
            os.chdir(here)
        overhead = process_overhead()
        peaks = host_peaks(sizes, result['start'] == 'meta', result['save_format'], overhead,
                           device='cpu')
        held = sizes.shard_params + sizes.shard_optimizer
        for rank, records in enumerate(result['runs'][0]['ranks']):
            key = 'rank0' if rank == 0 else 'other'
            start, save = _phase(records, 'start'), _phase(records, 'save')
            before = records[records.index(save) - 1]  # the 'train' record: RSS at the save
            measured_inc = save['peak_rss_mib'] - before['rss_mib']
            projected_inc = (peaks['save'][key] - overhead - held) / MIB
            rows.append(dict(
                model=_model_name(result), method=result['method'], start=result['start'],
                save_format=result['save_format'], rank=rank,
                overhead_mib=round(overhead / MIB, 1),
                start_measured=start['peak_rss_mib'],
                start_projected=round(peaks['start'][key] / MIB, 1),
                save_measured=save['peak_rss_mib'],
                save_projected=round(peaks['save'][key] / MIB, 1),
                save_increment_measured=round(measured_inc, 1),
                save_increment_projected=round(projected_inc, 1),
                sizes={k: v for k, v in sizes.as_dict().items()}))
    return rows


def check_markdown(rows: list[dict]) -> str:
    """The projection check as a table (GiB; error = projected - measured in GiB, and in % of
    the measured figure where that is >= 0.25 GiB)."""
    def cell(projected, measured):
        error = projected - measured
        share = f', {100 * error / measured:+.0f}%' if abs(measured) >= 256 else ''
        return f'{projected / 1024:.2f} / {measured / 1024:.2f} ({error / 1024:+.2f}{share})'

    lines = ['| model | method | start | save | rank | start: projected / measured | save: '
             'projected / measured | save increment: projected / measured |',
             '|' + '---|' * 8]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['start']} | {r['save_format']} | "
                     f"{r['rank']} | {cell(r['start_projected'], r['start_measured'])} | "
                     f"{cell(r['save_projected'], r['save_measured'])} | "
                     f"{cell(r['save_increment_projected'], r['save_increment_measured'])} |")
    return '\n'.join(lines)


#: the InternViT-6B configs of the projection (docs/sharding.md "Host memory")
PROJECT_CONFIGS = ('configs/ade20k/internvit6b_full_fsdp.py',
                   'configs/ade20k/internvit6b_flora_r16_fsdp.py')
#: (label, meta_init, save format): before / after issue 24's changes, and the step between
SCHEMES = (('before: gathered start, gathered save', False, 'full'),
           ('meta start, gathered save', True, 'full'),
           ('after: meta start, DCP save', True, 'dcp'))


def projection_markdown(configs: Sequence[str], gpus: Sequence[int], overhead: Optional[int],
                        file_dtype: str = 'bfloat16', device: str = 'cuda') -> str:
    """Projected per-rank peak host RSS (GiB) of ``configs`` on each of ``gpus`` for the
    three :data:`SCHEMES`, with each rank's shard (weights + gradients + optimizer state) and
    whether the peak stays within shard + 2 GiB (rank 0 / the other ranks)."""
    import torch
    from mmengine.config import Config

    from ..apis.host_memory import config_host_sizes, host_peaks, process_overhead
    from ..apis.memory import build_meta_model
    lines = ['| config | GPUs | scheme | shard (w+g+o) | start rank 0 / others | save rank 0 / '
             'others | start <= shard+2 | save <= shard+2 |', '|' + '---|' * 8]
    dtype = getattr(torch, file_dtype)
    for path in configs:
        cfg = Config.fromfile(path)
        model = build_meta_model(cfg)
        base = process_overhead() if overhead is None else overhead
        for g in gpus:
            sizes = config_host_sizes(cfg, g, model=model, file_dtype=dtype)
            limit = sizes.shard + 2 * GIB
            for label, meta, fmt in SCHEMES:
                p = host_peaks(sizes, meta, fmt, base, device=device)

                def ok(ranks):
                    return '/'.join('yes' if v is None or v <= limit else 'no'
                                    for v in (ranks['rank0'], ranks['other']))

                def gib(ranks):
                    return ' / '.join('-' if v is None else f'{v / GIB:.1f}'
                                      for v in (ranks['rank0'], ranks['other']))
                lines.append(f'| {osp.basename(path)} | {g} | {label} | '
                             f'{sizes.shard / GIB:.1f} | {gib(p["start"])} | {gib(p["save"])} '
                             f'| {ok(p["start"])} | {ok(p["save"])} |')
        del model
    return '\n'.join(lines)


def _model_name(result: dict) -> str:
    arch = result.get('arch') or {}
    return (f"InternViT d{arch.get('embed_dim')} x{arch.get('depth')} {result.get('dtype')}, "
            f"{result.get('procs')} procs")


def _target(peak: Optional[float], shard: float) -> str:
    if peak is None:
        return '-'
    return 'yes' if peak <= shard + 2 * 1024 else 'no'


def markdown(rows: list[dict]) -> str:
    head = ('| model | method | start | save | rank | start peak | load peak | save peak | shard '
            '(w+g+o) | start <= shard+2 GiB | save <= shard+2 GiB |')
    lines = [head, '|' + '---|' * 11]
    for r in rows:
        def gib(v):
            return '-' if v is None else f'{v / 1024:.2f}'
        lines.append(f"| {r['model']} | {r['method']} | {r['start_scheme']} | "
                     f"{r['save_format']} | {r['rank']} | {gib(r['start_mib'])} | "
                     f"{gib(r['load_mib'])} | {gib(r['save_mib'])} "
                     f"| {gib(r['shard_mib'])} | {_target(r['start_mib'], r['shard_mib'])} "
                     f"| {_target(r['save_mib'], r['shard_mib'])} |")
    return '\n'.join(lines)


def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Run the variants ``args`` names (``flora_mm.cli.measure_host_memory`` parses them;
    ``argv`` is kept as the command in the report)."""
    root = find_checkout('configs', 'tools')
    if root is None:
        raise SystemExit('host memory harness: needs a checkout (configs/, tools/)')
    if args.project is not None:
        overhead = (None if args.host_overhead_gib is None
                    else int(args.host_overhead_gib * GIB))
        text = projection_markdown([osp.join(root, c) for c in PROJECT_CONFIGS],
                                   args.project or [8, 16], overhead)
        print(text)
        return dict(projection=text)
    out = osp.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    from ..datasets.tiny import generate_ade20k
    if not osp.isdir(osp.join(out, 'data/tiny/ade')):
        generate_ade20k(osp.join(out, 'data/tiny'), num_train=4, num_val=1)
    tag = f"internvit_{args.embed_dim}x{args.depth}_{args.dtype}"
    pretrained = osp.join(out, 'data', f'{tag}.pth')
    if not osp.isfile(pretrained):
        # its own process: the whole model is built in fp32 there, and its memory goes back
        subprocess.run([args.python, '-c', (
            'import sys; from flora_mm.datasets.checkpoints import write_internvit_checkpoint;'
            f'write_internvit_checkpoint({pretrained!r}, {args.arch!r}, {args.dtype!r})')],
            check=True, env=child_env(cwd=out), cwd=out)
    report_path = osp.join(out, 'host_memory.json')
    results = _previous_results(report_path)
    for method in ([] if args.report_only else args.methods):
        for start in args.starts:
            for fmt in args.save_formats:
                result = run_variant(
                    root, out, args.python, args.procs, method, start, fmt, args.arch,
                    args.dtype, pretrained, args.save_format_option, not args.no_load,
                    int(args.min_available_gib * GIB), args.wait_s, args.timeout_s)
                result.update(arch=args.arch, dtype=args.dtype, procs=args.procs,
                              pretrained_bytes=os.path.getsize(pretrained),
                              machine=_machine(),
                              date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
                              command=' '.join(['tools/measure_host_memory.py', *argv]))
                key = _key(result)
                results = [r for r in results if _key(r) != key] + [result]
                rows = [row for r in results for row in summarise(r)]
                with open(report_path, 'w', encoding='utf-8') as f:
                    json.dump(dict(results=results, rows=rows), f, indent=1)
                with open(osp.join(out, 'host_memory.md'), 'w', encoding='utf-8') as f:
                    f.write(markdown(rows) + '\n')
    rows = [row for r in results for row in summarise(r)]
    check = projection_check(results, out)
    with open(report_path, 'w', encoding='utf-8') as f:
        json.dump(dict(results=results, rows=rows, projection_check=check), f, indent=1)
    with open(osp.join(out, 'host_memory.md'), 'w', encoding='utf-8') as f:
        f.write(markdown(rows) + '\n\nProjection (flora_mm/apis/host_memory.py, shards on the '
                'CPU) against the measurement, GiB:\n\n' + check_markdown(check) + '\n')
    print(markdown(rows))
    print(check_markdown(check))
    return dict(results=results, rows=rows, projection_check=check)


def _key(result: dict) -> tuple:
    """A measured variant: same model, processes, method, start and save format."""
    return (tuple(sorted(result['arch'].items())), result['dtype'], result['procs'],
            result['method'], result['start'], result['save_format'])


def _previous_results(path: str) -> list[dict]:
    """The variants an earlier call measured into the same ``--out`` (a rerun with other
    ``--save-formats`` adds its rows to the same table)."""
    if not osp.isfile(path):
        return []
    with open(path, encoding='utf-8') as f:
        report = json.load(f)
    shared = {k: report[k] for k in ('arch', 'dtype', 'procs', 'pretrained_bytes', 'machine',
                                     'date', 'command') if k in report}
    results = [dict(shared, **r) for r in report.get('results', [])]  # older: shared
    for r in results:  # the first reports named the config by method, start and format
        r.setdefault('config', osp.join(osp.dirname(path),
                                        f"{r['method']}_{r['start']}_{r['save_format']}.py"))
    return results


def _machine() -> str:
    cpus = os.cpu_count()
    total = 0
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import platform
    return f'{platform.processor() or platform.machine()}, {cpus} CPUs, {total / GIB:.0f} GiB'
