"""Compare PEFT methods the way the paper does (Table 1 / Table 2 / Fig. 2).

Why: the question users bring is "on my task and backbone, how do FLoRA, LoRA, DoRA, BitFit,
Full and Frozen compare at the same parameter budget?". This module plans the runs (a list of
configs, or one base config x methods x budgets with ranks solved by
:mod:`flora_mm.apis.budget`), trains and tests each one with the package's own tools
(``python -m flora_mm.cli.train`` / ``flora_mm.cli.test``, torchrun for several processes:
:mod:`flora_mm.harness.launch`) in its own work dir, and collects per run:

* parameter counts on the meta device (the method's own tensors, the model's trainable total);
* the task metrics from the test run's own results file (the json mmengine's LoggerHook dumps
  after ``runner.test()``, ``<work_dir>/<timestamp>/<timestamp>.json``), never from log text;
* seconds per training iteration (mmengine's ``time`` in ``vis_data/scalars.json``) and peak
  memory (CUDA: the ``memory`` mmengine logs; CPU: the training process's peak RSS).

It writes ``compare.md`` (Table 1's layout: methods as rows, ``# Params``, metric columns per
task, the mean of all metric columns), ``compare.csv``, ``compare.json`` and ``compare.png``.
A run whose ``result.json`` exists is skipped, so an interrupted comparison resumes; an
interrupted training resumes from its last checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from mmengine.config import Config

from ..registry import PEFT_METHODS
from ..utils import atomic_paths
from ..apis import budget as B
from ..apis.count import count_params
from .launch import child_env, tool_command

# How a method is labelled, ordered, counted and drawn, each method class declares itself
# (PEFTMethod.label, table_order, budget_rank, budget_rank_choices, trains_module,
# plot_style); this module only asks the registry.


def _method_cls(name: str):
    """The registered class of a method name (None for a name no longer registered)."""
    return PEFT_METHODS.get(name) if name else None


def _label(method: str) -> str:
    cls = _method_cls(method)
    return cls.label if cls is not None else method


def __getattr__(name: str):
    # METHOD_ORDER (the paper's Table 1 rows) and METHOD_LABEL, read from the registry
    if name == 'METHOD_ORDER':
        return tuple(cls.__name__ for cls in B.registered_methods())
    if name == 'METHOD_LABEL':
        return {cls.__name__: cls.label for cls in B.registered_methods()
                if cls.label != cls.__name__}
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

_COCO_SUFFIX = (('mAP', 'mAP'), ('mAP_50', 'AP50'), ('mAP_75', 'AP75'), ('mAP_s', 'APs'),
                ('mAP_m', 'APm'), ('mAP_l', 'APl'))


@dataclass(frozen=True)
class MetricColumn:
    key: str        # key in the evaluator's results
    header: str     # column header (after the task name)
    scale: float    # to percent


def metric_columns(evaluator: dict) -> tuple[list[MetricColumn], str]:
    """The paper's columns for a test evaluator, and the key the plot shows."""
    kind = str(evaluator.get('type', '')).split('.')[-1]
    if kind == 'CocoMetric':
        types = evaluator.get('metric', 'bbox')
        types = [types] if isinstance(types, str) else list(types)
        cols = [MetricColumn(f'coco/{t}_{suffix}', f'{"box" if t == "bbox" else "mask"} {name}',
                             100.0)
                for t in types if t in ('bbox', 'segm') for suffix, name in _COCO_SUFFIX]
        return cols, cols[0].key
    if kind == 'IoUMetric':
        return [MetricColumn('mAcc', 'mAcc', 1.0), MetricColumn('mIoU', 'mIoU', 1.0)], 'mIoU'
    if kind == 'DOTAMetric':
        return [MetricColumn('dota/mAP', 'mAP', 100.0), MetricColumn('dota/AP50', 'AP50', 100.0),
                MetricColumn('dota/AP75', 'AP75', 100.0)], 'dota/mAP'
    raise CompareError(f'no metric columns known for evaluator {kind!r}: supported are '
                       'CocoMetric, IoUMetric and DOTAMetric')


#: DOTA: the paper reports COCO-style mAP (IoU 0.5:0.95), AP50 and AP75
DOTA_IOU_THRS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
_DATASET_LABEL = {'CocoDataset': 'COCO', 'ADE20KDataset': 'ADE20K', 'DOTADataset': 'DOTA'}


#: with ``jobs`` > 1 only the subprocesses run side by side; in-process work takes turns
_IN_PROCESS = threading.Lock()


class CompareError(RuntimeError):
    """A comparison that cannot go on; the message names the run and the reason."""


# ----------------------------------------------------------------------------- planning
@dataclass
class RunSpec:
    """One training + test run of the comparison."""

    name: str                   # unique; also the run's folder under <out>/<task>/
    task: str                   # dataset label: COCO, ADE20K, DOTA, ...
    config: str                 # the config it derives from (absolute path)
    method: str
    backbone: str               # e.g. ConvNeXtV2-large
    peft: dict                  # model.backbone.peft of the run
    budget: Optional[str] = None
    rank: Optional[int] = None
    kernel_rank: Optional[int] = None
    overrides: dict = field(default_factory=dict)  # other top-level config keys of the run
    loop: str = 'epochs'        # the training loop counts 'epochs' or 'iters'

    def config_text(self) -> str:
        """The run's own config: the source config, its PEFT method and the overrides."""
        # the module's old name stays: this text is part of every run's fingerprint
        lines = ['# Written by flora_mm.apis.compare: one run of a method comparison.',
                 f'_base_ = {self.config!r}',
                 f'model = dict(backbone=dict(peft=dict(_delete_=True, **{self.peft!r})))']
        lines += [f'{k} = {v!r}' for k, v in self.overrides.items()]
        return '\n'.join(lines) + '\n'


def _evaluator(cfg: Config) -> dict:
    evaluator = cfg.get('test_evaluator', None)
    if isinstance(evaluator, (list, tuple)):
        evaluator = evaluator[0] if evaluator else None
    if not isinstance(evaluator, dict):
        raise CompareError(f'{cfg.filename}: needs a test_evaluator to compare methods')
    return evaluator


def _thresholds(evaluator: dict) -> list[float]:
    thrs = evaluator.get('iou_thrs', [0.5])
    return sorted(round(float(t), 2) for t in ([thrs] if isinstance(thrs, (int, float)) else thrs))


def _task_label(cfg: Config) -> str:
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    while isinstance(dataset, dict) and 'dataset' in dataset:  # wrappers
        dataset = dataset['dataset']
    kind = str(dataset.get('type', '')).split('.')[-1] if isinstance(dataset, dict) else ''
    return _DATASET_LABEL.get(kind, kind.replace('Dataset', '') or 'task')


def _backbone_label(cfg: Config) -> str:
    inner = cfg.model.backbone.get('backbone', {})
    arch = inner.get('arch', '')
    return f'{inner.get("type", "backbone")}-{arch}' if isinstance(arch, str) and arch else \
        str(inner.get('type', 'backbone'))


def _method_name(peft: dict) -> str:
    cls = PEFT_METHODS.get(peft.get('type', ''))
    if cls is None:
        raise CompareError(f'unknown PEFT method {peft.get("type")!r}')
    return cls.__name__


def _run_ranks(peft: dict, defaults: bool) -> tuple[Optional[int], Optional[int]]:
    """The rank and second rank (FLoRA's kernel rank) of a run's ``peft``, for methods that
    have them; with ``defaults``, the method's own where ``peft`` does not set them."""
    cls = PEFT_METHODS.get(peft['type'])
    if cls.budget_rank is None:
        return None, None

    def value(name: Optional[str]) -> Optional[int]:
        if name is None:
            return None
        return peft.get(name, getattr(cls, name)) if defaults else peft.get(name)

    return value(cls.budget_rank), value(B.second_rank(cls)[0])


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9.]+', '', text.replace('%', 'pct')).lower()


def plan_runs(configs: Sequence[str], methods: Optional[Sequence[str]] = None,
              budgets: Optional[Sequence[str]] = None,
              kernel_ranks: Optional[Sequence[int]] = None,
              log: Callable[[str], None] = print,
              dota_iou_thrs: Sequence[float] = DOTA_IOU_THRS) -> list[RunSpec]:
    """Runs for ``configs`` as they are, or, with ``methods``, every method on every config
    (a base config: its data, model and schedule, with the method in ``model.backbone.peft``).

    Rank methods (LoRA, DoRA, FLoRA) get one run per budget, with the rank solved on the meta
    device; without budgets they keep the base config's rank (same method) or their defaults.
    DOTA runs are tested at ``dota_iou_thrs`` (the paper's mAP needs 0.5:0.95; each threshold
    is one more evaluation pass, which is slow on CPU for an untrained detector).
    """
    specs: list[RunSpec] = []
    solved: dict[str, B.Solution] = {}  # tasks sharing a backbone share its solutions
    for config in configs:
        if not osp.isfile(config):
            raise CompareError(f'config file not found: {config}')
        path = osp.abspath(config)
        cfg = Config.fromfile(path)
        base = B.base_peft(cfg)
        evaluator = _evaluator(cfg)
        metric_columns(evaluator)  # fails early for an unsupported evaluator
        task, backbone = _task_label(cfg), _backbone_label(cfg)
        overrides = {}
        kind = str(evaluator.get('type', '')).split('.')[-1]
        if kind == 'DOTAMetric' and _thresholds(evaluator) != _thresholds(
                dict(iou_thrs=dota_iou_thrs)):
            overrides['test_evaluator'] = dict(iou_thrs=[float(t) for t in dota_iou_thrs])
        stem = osp.splitext(osp.basename(path))[0]
        train_cfg = cfg.get('train_cfg', None) or {}
        loop = 'iters' if 'max_iters' in train_cfg or 'Iter' in str(train_cfg.get('type', '')) \
            else 'epochs'
        if not methods:
            method = _method_name(base)
            rank, second = _run_ranks(base, defaults=False)
            specs.append(RunSpec(name=stem, task=task, config=path, method=method,
                                 backbone=backbone, peft=base, overrides=overrides, loop=loop,
                                 rank=rank, kernel_rank=second))
            continue
        for method in methods:
            method = _method_name(dict(type=method))
            peft = B.method_peft(method, base)
            if PEFT_METHODS.get(method).budget_rank is None or not budgets:
                rank, second = _run_ranks(peft, defaults=True)
                specs.append(RunSpec(
                    name=f'{stem}-{method.lower()}' + (f'_r{rank}' if rank else ''),
                    task=task, config=path, method=method, backbone=backbone, peft=peft,
                    overrides=overrides, rank=rank, loop=loop, kernel_rank=second))
                continue
            for budget in budgets:
                key = json.dumps([B.to_plain(cfg.model.backbone), method, budget,
                                  kernel_ranks and list(kernel_ranks)], sort_keys=True,
                                 default=str)
                if key not in solved:
                    solved[key] = B.solve_rank(cfg, budget, method=method,
                                               kernel_ranks=kernel_ranks)
                sol = solved[key]
                second = B.second_rank(PEFT_METHODS.get(method))[0]
                log(f'[compare] {task} {method} at {budget}: rank {sol.rank}'
                    + (f', {second.replace("_", " ")} {sol.kernel_rank}'
                       if sol.kernel_rank else '')
                    + f' -> {sol.count:,} ({100 * sol.rel_error:+.2f}%)')
                specs.append(RunSpec(
                    name=f'{stem}-{method.lower()}_{_slug(sol.budget)}', task=task, config=path,
                    method=method, backbone=backbone, peft=sol.peft, budget=sol.budget,
                    rank=sol.rank, kernel_rank=sol.kernel_rank, overrides=overrides,
                    loop=loop))
    names = [(s.task, s.name) for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CompareError(f'two runs would share a work dir: {dupes}; give distinct configs')
    return specs


# ----------------------------------------------------------------------------- running
@dataclass
class RunOptions:
    """How runs are launched.

    ``gpus`` > 1 runs torchrun (as tools/dist_{train,test}.sh) with that many processes;
    ``max_epochs`` / ``max_iters`` shorten training for configs whose loop counts epochs /
    iterations (the other kind ignores it; checkpointing and the last validation follow the
    loop's end); ``train_options`` are more ``--cfg-options`` for training; ``train_val=False``
    turns off validation during training (the test run evaluates); ``jobs`` runs that many runs
    at once, each with its share of the CPU threads; relative paths in configs (data roots)
    resolve against ``cwd``.
    """

    gpus: int = 1
    max_epochs: Optional[int] = None
    max_iters: Optional[int] = None
    train_options: Sequence[str] = ()
    train_val: bool = True
    jobs: int = 1
    cwd: Optional[str] = None
    python: str = sys.executable
    port: int = 29500
    env: dict = field(default_factory=dict)

    def train_cfg_options(self, spec: RunSpec) -> list[str]:
        options = []
        if spec.loop == 'epochs' and self.max_epochs:
            options.append(f'train_cfg.max_epochs={int(self.max_epochs)}')
        if spec.loop == 'iters' and self.max_iters:
            options.append(f'train_cfg.max_iters={int(self.max_iters)}')
        options += list(self.train_options)
        if not self.train_val:
            options += ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
        return options


def _fingerprint(spec: RunSpec, opts: RunOptions) -> str:
    blob = json.dumps([spec.config_text(), opts.train_cfg_options(spec)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: str, data) -> None:
    """Atomic: a reader never sees half a file (an interrupted run leaves none)."""
    with atomic_paths(path) as (tmp,):
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=2)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _launch(cmd: list[str], log_path: str, cwd: str, env: dict) -> tuple[int, float, float]:
    """Run ``cmd`` with output to ``log_path``; (exit code, wall seconds, peak RSS MiB of the
    largest process in its tree, from the kernel's accounting of the reaped child)."""
    start = time.time()
    with open(log_path, 'a') as log:
        log.write(f'$ {" ".join(cmd)}\n')
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - start, usage.ru_maxrss / 1024.0  # KiB on Linux


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors='replace') as f:
        return ''.join(f.readlines()[-n:])


def _command(tool: str, args: list[str], opts: RunOptions, env: dict) -> list[str]:
    """python -m flora_mm.cli.train / test, or with several processes the torchrun command of
    tools/dist_train.sh / dist_test.sh (its NNODES, PORT, ... from ``env``)."""
    return tool_command(tool, args, python=opts.python, gpus=opts.gpus, env=env)


def _scalars(work_dir: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def read_train_stats(work_dir: str) -> dict:
    """Seconds per iteration and CUDA peak memory from mmengine's own training scalars.

    ``time`` is mmengine's per-iteration time averaged over the logger's window; the first
    logged window holds the warm-up and is left out when there are later ones.
    """
    train = [r for r in _scalars(work_dir) if 'lr' in r and 'time' in r]
    times = [r['time'] for r in (train[1:] if len(train) > 1 else train)]
    memory = [r['memory'] for r in train if 'memory' in r]
    return dict(sec_per_iter=sum(times) / len(times) if times else None,
                cuda_memory_mb=max(memory) if memory else None, iterations=max(
                    (r.get('iter', r.get('step', 0)) for r in train), default=0))


def read_test_metrics(work_dir: str) -> dict:
    """The metrics ``runner.test()`` dumped (LoggerHook: ``<timestamp>/<timestamp>.json``)."""
    found = []
    for path in glob.glob(osp.join(work_dir, '*', '*.json')):
        stamp = osp.basename(osp.dirname(path))
        if osp.basename(path) == f'{stamp}.json':
            found.append(path)
    if not found:
        raise CompareError(f'no test results file (<timestamp>/<timestamp>.json) in {work_dir}')
    with open(max(found, key=osp.getmtime)) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return lines[-1]


def count_run(config: str) -> dict:
    """Meta-device counts of a run's config: the backbone's (``budget.count_backbone``) and the
    whole model's trainable / total parameters (``count_params``, tools/count_params.py)."""
    counts = B.count_backbone(config)
    model = count_params(config)
    return dict(counts, model_trainable=model['trainable'], model_total=model['total'])


def execute(spec: RunSpec, out_dir: str, opts: RunOptions,
            log: Callable[[str], None] = print) -> dict:
    """Train, test and collect one run, or return its stored result if it already finished."""
    run_dir = osp.join(osp.abspath(out_dir), _slug(spec.task), spec.name)
    os.makedirs(run_dir, exist_ok=True)
    fingerprint = _fingerprint(spec, opts)
    result_path = osp.join(run_dir, 'result.json')
    if osp.isfile(result_path):
        result = _read_json(result_path)
        if result.get('fingerprint') != fingerprint:
            raise CompareError(f'{run_dir} holds a finished run of a different config or '
                               'options: use another output folder or delete it')
        log(f'[compare] {spec.task}/{spec.name}: finished before, skipped')
        return dict(result, skipped=True)
    config = osp.join(run_dir, f'{spec.name}.py')
    with open(config, 'w') as f:
        f.write(spec.config_text())
    cwd = opts.cwd or os.getcwd()
    env = dict(os.environ, **opts.env)
    if opts.jobs > 1 and 'OMP_NUM_THREADS' not in opts.env:  # share the cores between runs
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // opts.jobs))
    env = child_env(env, cwd)  # the runs import this flora_mm
    if opts.gpus > 1:
        env.setdefault('PYTHON', opts.python)
        env.setdefault('PORT', str(opts.port))
    train_dir, test_dir = osp.join(run_dir, 'train'), osp.join(run_dir, 'test')
    done_path = osp.join(run_dir, 'train_done.json')
    done = _read_json(done_path) if osp.isfile(done_path) else None
    if done is not None and done.get('fingerprint') != fingerprint:
        raise CompareError(f'{run_dir} holds a training run of a different config or options: '
                           'use another output folder or delete it')
    if done is None:
        args = [config, '--work-dir', train_dir]
        if osp.isfile(osp.join(train_dir, 'last_checkpoint')):
            args.append('--resume')  # an interrupted run goes on from its last checkpoint
        options = opts.train_cfg_options(spec)
        if options:
            args += ['--cfg-options', *options]
        log(f'[compare] {spec.task}/{spec.name}: training')
        code, seconds, rss = _launch(_command('train', args, opts, env),
                                     osp.join(run_dir, 'train.log'), cwd, env)
        if code != 0:
            raise CompareError(f'training {spec.task}/{spec.name} failed (exit {code}); log '
                               f'{osp.join(run_dir, "train.log")}:\n'
                               f'{_tail(osp.join(run_dir, "train.log"))}')
        done = dict(fingerprint=fingerprint, seconds=seconds, peak_rss_mb=rss)
        _write_json(done_path, done)
    with open(osp.join(train_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    log(f'[compare] {spec.task}/{spec.name}: testing {osp.basename(checkpoint)}')
    code, test_seconds, _ = _launch(
        _command('test', [config, checkpoint, '--work-dir', test_dir], opts, env),
        osp.join(run_dir, 'test.log'), cwd, env)
    if code != 0:
        raise CompareError(f'testing {spec.task}/{spec.name} failed (exit {code}); log '
                           f'{osp.join(run_dir, "test.log")}:\n'
                           f'{_tail(osp.join(run_dir, "test.log"))}')
    stats = read_train_stats(train_dir)
    on_cuda = stats['cuda_memory_mb'] is not None
    with _IN_PROCESS:  # config parsing (pkg_resources) and registries are not thread-safe
        counts = count_run(config)
    result = dict(
        asdict(spec), fingerprint=fingerprint, run_dir=run_dir, run_config=config,
        checkpoint=checkpoint, counts=counts, metrics=read_test_metrics(test_dir),
        sec_per_iter=stats['sec_per_iter'], iterations=stats['iterations'],
        peak_memory_mb=stats['cuda_memory_mb'] if on_cuda else done['peak_rss_mb'],
        memory_kind='cuda max allocated' if on_cuda else 'cpu peak rss',
        train_seconds=done['seconds'], test_seconds=test_seconds)
    _write_json(result_path, result)
    return dict(result, skipped=False)


# ----------------------------------------------------------------------------- tables
def _row_key(result: dict) -> tuple:
    peft = {k: v for k, v in result['peft'].items()
            if k in ('type', 'rank', 'kernel_rank', 'ranks', 'alpha')}
    return (result['backbone'], result['method'], result.get('budget')
            or json.dumps(peft, sort_keys=True))


def build_table(results: Sequence[dict]) -> dict:
    """Table 1's layout from run results: one row per (backbone, method, budget), a column
    group per task (in the order first seen), the mean of every metric column."""
    tasks: dict[str, dict] = {}
    partial_sweep: set[str] = set()  # DOTA runs whose 'mAP' is not the 0.5:0.95 mean
    for r in results:
        cfg = Config.fromfile(r['run_config'])
        evaluator = _evaluator(cfg)
        if 'DOTAMetric' in str(evaluator.get('type')) and _thresholds(evaluator) != \
                _thresholds(dict(iou_thrs=DOTA_IOU_THRS)):
            partial_sweep.add(r['run_dir'])
        cols, primary = metric_columns(evaluator)
        header = next(c.header for c in cols if c.key == primary)
        entry = tasks.setdefault(r['task'], dict(columns=[], primary=primary,
                                                  primary_header=header))
        for col in cols:  # the evaluator's columns, scored or not (a missing score is '-')
            if col not in entry['columns']:
                entry['columns'].append(col)
    rows: dict[tuple, dict] = {}
    for r in results:
        row = rows.setdefault(_row_key(r), dict(
            backbone=r['backbone'], method=r['method'], budget=r.get('budget'),
            rank=r.get('rank'), kernel_rank=r.get('kernel_rank'), params={}, share={},
            metrics={}, sec_per_iter={}, peak_memory_mb={}, memory_kind={}, runs={}))
        counts = r['counts']
        row['params'][r['task']] = counts['method_params']
        row['share'][r['task']] = counts['method_params'] / counts['backbone_params']
        row['sec_per_iter'][r['task']] = r['sec_per_iter']
        row['peak_memory_mb'][r['task']] = r['peak_memory_mb']
        row['memory_kind'][r['task']] = r['memory_kind']
        row['runs'][r['task']] = r['run_dir']
        for col in tasks[r['task']]['columns']:
            value = r['metrics'].get(col.key)
            if col.key == 'dota/mAP' and r['run_dir'] in partial_sweep:
                value = None  # mmrotate's mean over other thresholds: not the paper's mAP
            # COCO reports -1 for an area range with no objects: not a score
            if value is not None and value >= 0:
                row['metrics'][(r['task'], col.header)] = value * col.scale
    columns = [(task, col.header) for task, t in tasks.items() for col in t['columns']]
    for row in rows.values():
        values = [row['metrics'][c] for c in columns if c in row['metrics']]
        row['avg'] = sum(values) / len(values) if values else None

    def order(row: dict) -> tuple:
        cls = _method_cls(row['method'])
        # methods without a rank have one size: their rows first, in table order
        fixed = cls is not None and cls.budget_rank is None
        rank_of = cls.table_order if cls is not None else 99
        size = max(row['params'].values())
        return (row['backbone'], not fixed, rank_of if fixed else 0,
                _budget_sort(row['budget'], size), rank_of, size)

    return dict(tasks={t: dict(v, columns=[asdict(c) for c in v['columns']])
                       for t, v in tasks.items()},
                columns=columns, rows=sorted(rows.values(), key=order))


def _budget_sort(budget: Optional[str], size: int) -> float:
    if budget is None:
        return float(size)
    parsed = B.parse_budget(budget)
    return parsed.value * (1e12 if parsed.relative else 1.0)


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f'{value:.{digits}f}'


def _params_cell(row: dict) -> str:
    cls = _method_cls(row['method'])
    if cls is not None and not cls.trains_module:
        return '-'
    counts = sorted(set(row['params'].values()))
    shares = sorted(set(round(100 * s, 2) for s in row['share'].values()))
    text = ' / '.join(B.format_count(c) for c in counts)
    share = ' / '.join(f'{s:g}%' for s in shares)
    return f'{text} ({share})'


def _method_cell(row: dict) -> str:
    label = _label(row['method'])
    if row['rank'] is not None:
        label += f' r{row["rank"]}' + (f'/{row["kernel_rank"]}' if row['kernel_rank'] else '')
    return label


def format_markdown(table: dict, files: Optional[dict] = None) -> str:
    """compare.md: a Table 1 per backbone, then the cost of every run."""
    out = ['# Method comparison', '',
           'Rows: methods (rank / kernel rank after the name); `# Params`: the backbone tensors '
           'the method trains (adapters for LoRA/DoRA/FLoRA, biases for BitFit), with their '
           'share of the pretrained backbone. Metrics in percent; `Avg.` is the mean of the '
           'scored metric columns, as in the paper. `-`: no score (COCO gives -1 for an area '
           'range without objects, and nothing while a detector detects nothing).', '']
    columns = table['columns']
    for backbone in dict.fromkeys(r['backbone'] for r in table['rows']):
        rows = [r for r in table['rows'] if r['backbone'] == backbone]
        out += [f'## {backbone}', '']
        head = ['Method', '# Params'] + [f'{t} {h}' for t, h in columns] + ['Avg.']
        out.append('| ' + ' | '.join(head) + ' |')
        out.append('| --- | ---: |' + ' ---: |' * (len(columns) + 1))
        for r in rows:
            cells = [_method_cell(r), _params_cell(r)]
            cells += [_fmt(r['metrics'].get(c)) for c in columns] + [_fmt(r['avg'])]
            out.append('| ' + ' | '.join(cells) + ' |')
        out.append('')
        tasks = list(table['tasks'])
        out += ['Cost per run: seconds per training iteration / peak memory in MiB '
                '(CUDA max allocated on a GPU, the training process\'s peak RSS on CPU).', '',
                '| Method | ' + ' | '.join(f'{t} s/iter | {t} MiB' for t in tasks) + ' |',
                '| --- |' + ' ---: | ---: |' * len(tasks)]
        for r in rows:
            cells = [_method_cell(r)]
            for t in tasks:
                cells += [_fmt(r['sec_per_iter'].get(t), 3), _fmt(r['peak_memory_mb'].get(t), 0)]
            out.append('| ' + ' | '.join(cells) + ' |')
        out.append('')
    if files:
        out += ['Files: ' + ', '.join(f'`{osp.basename(p)}`' for p in files.values()), '']
    return '\n'.join(out)


def format_csv(table: dict) -> str:
    """compare.csv: the same rows with full precision and the cost columns."""
    columns = table['columns']
    tasks = list(table['tasks'])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['backbone', 'method', 'budget', 'rank', 'kernel_rank']
                    + [f'params/{t}' for t in tasks] + [f'share/{t}' for t in tasks]
                    + [f'{t}/{h}' for t, h in columns] + ['avg']
                    + [f'sec_per_iter/{t}' for t in tasks] + [f'peak_memory_mb/{t}' for t in tasks])
    for r in table['rows']:
        writer.writerow([r['backbone'], r['method'], r['budget'] or '', r['rank'] or '',
                         r['kernel_rank'] or '']
                        + [r['params'].get(t, '') for t in tasks]
                        + [r['share'].get(t, '') for t in tasks]
                        + [r['metrics'].get(c, '') for c in columns]
                        + ['' if r['avg'] is None else r['avg']]
                        + [r['sec_per_iter'].get(t, '') for t in tasks]
                        + [r['peak_memory_mb'].get(t, '') for t in tasks])
    return buf.getvalue()


# ----------------------------------------------------------------------------- plot
PANEL_INCHES = (4.6, 3.6)
DPI = 100


def _place_rank_labels(ax, labels: list) -> None:
    """Rank labels beside their markers, none over another: methods at the same point (e.g. the
    same score at a matched budget) get their labels stacked, the first free slot above or
    below the marker (checked in pixels once the axes' limits are final)."""
    if not labels:
        return
    ax.autoscale_view()
    to_px = ax.figure.dpi / 72.0
    frame = ax.get_window_extent()
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text, color in labels:
        px, py = ax.transData.transform((x, y))
        w, h = (4.2 * len(text) + 2) * to_px, 8.0 * to_px  # 7 pt text, generously

        def box_at(dy: float) -> tuple[float, float, float, float]:
            return (px + 5 * to_px, py + dy * to_px, px + 5 * to_px + w, py + dy * to_px + h)

        def free(box) -> bool:
            return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                           for b in placed)

        offsets = (4, 12, 20, 28, 36, -12, -20, -28, -36)
        inside = [dy for dy in offsets
                  if frame.y0 <= box_at(dy)[1] and box_at(dy)[3] <= frame.y1]
        dy = next((dy for dy in inside + list(offsets) if free(box_at(dy))), offsets[0])
        box = box_at(dy)
        placed.append(box)
        ax.annotate(text, (x, y), textcoords='offset points', xytext=(5, dy), fontsize=7,
                    color=color)


def plot(table: dict, path: str) -> dict:
    """compare.png: per task its main metric (and with several tasks the average) against the
    method's trainable parameters on a log axis; a line per method across budgets, Base as a
    dashed level. Returns the image size in pixels and the series drawn per panel."""
    import matplotlib  # noqa: PLC0415  (only the plot needs it)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = table['tasks']
    def shown(task: str, info: dict) -> str:
        # the task's main metric, or its first scored column (e.g. DOTA AP50 without mAP)
        scored = [c['header'] for c in info['columns']
                  if any((task, c['header']) in r['metrics'] for r in table['rows'])]
        return info['primary_header'] if info['primary_header'] in scored or not scored \
            else scored[0]

    panels = [(t, (t, shown(t, v))) for t, v in tasks.items()]
    if len(tasks) > 1:
        panels.append(('All', None))
    backbones = list(dict.fromkeys(r['backbone'] for r in table['rows']))
    width, height = PANEL_INCHES[0] * len(panels), PANEL_INCHES[1] + 0.6
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), dpi=DPI, squeeze=False)
    series: dict[str, list[str]] = {}
    for ax, (task, column) in zip(axes[0], panels):
        title = f'{task} {column[1]}' if column else 'All: Avg. of the metric columns'
        ax.set_title(title, fontsize=10)
        series[title] = []
        labels: list = []  # rank labels, placed once the axes are final
        for backbone in backbones:
            for method in dict.fromkeys(r['method'] for r in table['rows']):
                rows = [r for r in table['rows'] if r['method'] == method
                        and r['backbone'] == backbone]
                points = []
                for r in rows:
                    y = r['avg'] if column is None else r['metrics'].get(column)
                    x = r['params'].get(task) if column else max(r['params'].values())
                    if y is not None and x is not None:
                        points.append((x, y, f'r{r["rank"]}' if r['rank'] else ''))
                if not points:
                    continue
                cls = _method_cls(method)
                label = _label(method)
                if len(backbones) > 1:
                    label += f' ({backbone})'
                color, marker = cls.plot_style if cls is not None else (None, 'o')
                level = cls is not None and not cls.trains_module
                if level or all(p[0] == 0 for p in points):
                    ax.axhline(points[0][1], color=color or 'k', ls='--', lw=1.2, label=label)
                else:
                    points.sort()
                    ax.plot([p[0] for p in points], [p[1] for p in points], color=color,
                            marker=marker, ms=9 if marker == '*' else 6, lw=1.5, label=label)
                    labels += [(x, y, text, color) for x, y, text in points if text]
                series[title].append(label)
        if not series[title]:  # e.g. a detector that found nothing yet: COCO gives no scores
            ax.text(0.5, 0.5, 'no scores', ha='center', va='center', transform=ax.transAxes,
                    color='0.4')
        ax.set_xscale('log')
        _place_rank_labels(ax, labels)
        ax.set_xlabel('trainable backbone parameters (log)', fontsize=9)
        ax.set_ylabel(f'{column[1]} (%)' if column else 'Avg. (%)', fontsize=9)
        ax.grid(True, which='both', alpha=0.3)
        ax.tick_params(labelsize=8)
    legend: dict = {}  # one entry per series, whichever panel has it
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc='lower center',
                   ncol=min(len(legend), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=DPI)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return dict(size=[int(size[0]), int(size[1])], series=series)


# ----------------------------------------------------------------------------- entry point
def compare(configs: Sequence[str], out_dir: str, methods: Optional[Sequence[str]] = None,
            budgets: Optional[Sequence[str]] = None,
            kernel_ranks: Optional[Sequence[int]] = None,
            options: Optional[RunOptions] = None,
            log: Callable[[str], None] = print,
            dota_iou_thrs: Sequence[float] = DOTA_IOU_THRS) -> dict:
    """Plan, run (skipping finished runs) and tabulate a comparison; returns the table, the
    per-run results and the paths of the files written."""
    options = options or RunOptions()
    out_dir = osp.abspath(out_dir)  # the runs start in options.cwd
    specs = plan_runs(configs, methods, budgets, kernel_ranks, log=log,
                      dota_iou_thrs=dota_iou_thrs)
    os.makedirs(out_dir, exist_ok=True)

    def one(item: tuple[int, RunSpec]) -> dict:
        i, spec = item
        log(f'[compare] run {i}/{len(specs)}: {spec.task} {spec.method}'
            + (f' at {spec.budget}' if spec.budget else ''))
        # distributed runs side by side need their own rendezvous ports
        return execute(spec, out_dir, dataclasses.replace(options, port=options.port + i - 1),
                       log=log)

    if options.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            results = list(pool.map(one, enumerate(specs, 1)))
    else:
        results = [one(item) for item in enumerate(specs, 1)]
    return write_outputs(results, out_dir)


def write_outputs(results: Sequence[dict], out_dir: str) -> dict:
    """compare.md / .csv / .json / .png from run results."""
    os.makedirs(out_dir, exist_ok=True)
    table = build_table(results)
    files = {ext: osp.join(out_dir, f'compare.{ext}') for ext in ('md', 'csv', 'json', 'png')}
    with atomic_paths(files['png']) as (tmp,):
        figure = plot(table, tmp)
    markdown = format_markdown(table, files)
    for ext, text in (('md', markdown), ('csv', format_csv(table))):
        with atomic_paths(files[ext]) as (tmp,):
            with open(tmp, 'w') as f:
                f.write(text)
    rows = [dict(r, metrics={f'{t}/{h}': v for (t, h), v in r['metrics'].items()})
            for r in table['rows']]
    _write_json(files['json'], dict(tasks=table['tasks'], columns=table['columns'], rows=rows,
                                    runs=[{k: v for k, v in r.items() if k != 'skipped'}
                                          for r in results], figure=figure))
    return dict(table=table, results=list(results), files=files, markdown=markdown,
                figure=figure)


__all__ = ['RunSpec', 'RunOptions', 'CompareError', 'MetricColumn', 'metric_columns',
           'plan_runs', 'execute', 'build_table', 'format_markdown', 'format_csv', 'plot',
           'compare', 'write_outputs', 'read_train_stats', 'read_test_metrics', 'count_run']
