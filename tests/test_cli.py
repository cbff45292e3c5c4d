"""flora_mm.cli: the tools' argument parsing in the package, and the numeric options refused
with argparse's clear error (exit status 2, the option named) instead of a traceback or a
silent misbehaviour; flora_mm.harness.launch: the commands the harnesses start.
"""
from __future__ import annotations

import argparse
import importlib
import os
import os.path as osp
import subprocess
import sys

import pytest

import flora_mm
from flora_mm.apis import budget as B
from flora_mm.cli import _args as A
from flora_mm.harness import launch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_COCO = osp.join(ROOT, 'configs/coco/tiny/convnextv2_flora_r16.py')
TOOLS = ('train', 'test', 'merge_adapters', 'count_params', 'estimate_memory',
         'make_tiny_data', 'compare', 'benchmark', 'demo', 'gpu_check', 'measure_host_memory',
         'dcp_to_pth')


def _refused(capsys, tool: str, argv: list[str], option: str) -> str:
    cli = importlib.import_module(f'flora_mm.cli.{tool}')
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert f'argument {option}:' in err, err
    return err


# (tool, arguments before the bad option, option, bad value)
BAD = [
    ('count_params', [TINY_COCO], '--budget', value) for value in
    ('1e400', 'nan', 'inf', '-1', '0', '1e300G', '101%', 'lots')
] + [
    ('compare', [TINY_COCO, '--methods', 'LoRA'], '--budgets', '1e400'),
    ('compare', [TINY_COCO, '--methods', 'LoRA'], '--budgets', 'nan'),
    ('compare', [TINY_COCO], '--kernel-ranks', '0'),
    ('compare', [TINY_COCO], '--gpus', '0'),
    ('compare', [TINY_COCO], '--max-epochs', '0'),
    ('compare', [TINY_COCO], '--max-epochs', '-1'),
    ('compare', [TINY_COCO], '--max-iters', '0'),
    ('compare', [TINY_COCO], '--max-iters', '1e400'),
    ('compare', [TINY_COCO], '--jobs', '0'),
    ('compare', [TINY_COCO], '--jobs', str(2 ** 40)),
    ('compare', [TINY_COCO], '--port', '0'),
    ('compare', [TINY_COCO], '--port', '70000'),
    ('compare', [TINY_COCO], '--dota-iou-thrs', 'nan'),
    ('compare', [TINY_COCO], '--dota-iou-thrs', '0'),
    ('compare', [TINY_COCO], '--dota-iou-thrs', '1.5'),
    ('compare', [TINY_COCO], '--dota-iou-thrs', 'inf'),
    ('estimate_memory', [TINY_COCO], '--gpus', '0'),
    ('estimate_memory', [TINY_COCO], '--device-gib', 'nan'),
    ('estimate_memory', [TINY_COCO], '--device-gib', 'inf'),
    ('estimate_memory', [TINY_COCO], '--device-gib', '1e400'),
    ('estimate_memory', [TINY_COCO], '--device-gib', '0'),
    ('benchmark', [], '--batch', '0'),
    ('benchmark', [], '--size', '-1'),
    ('benchmark', [], '--rounds', '0'),
    ('benchmark', [], '--warmup', '-1'),
    ('benchmark', [], '--threads', '0'),
    ('make_tiny_data', [], '--num-train', '0'),
    ('make_tiny_data', [], '--num-val', '-1'),
    ('make_tiny_data', [], '--seed', '-1'),
    ('make_tiny_data', [], '--seed', '1.5'),
]


@pytest.mark.parametrize('tool,before,option,value', BAD,
                         ids=[f'{t}{o}={v}' for t, _, o, v in BAD])
def test_numeric_options_are_refused(capsys, tool, before, option, value):
    # '--opt=value': argparse reads '-1' after a bare option as another option
    err = _refused(capsys, tool, [*before, f'{option}={value}'], option)
    assert 'Traceback' not in err


GOOD = [
    ('count_params', [TINY_COCO, '--budget', '12.9M'], dict(budget='12.9M')),
    ('count_params', [TINY_COCO, '--budget', '0.66%', '--kernel-ranks', '1', '2'],
     dict(budget='0.66%', kernel_ranks=[1, 2])),
    ('compare', [TINY_COCO, '--methods', 'LoRA', '--budgets', '2%', '500K', '--jobs', '2',
                 '--gpus', '2', '--port', '29501', '--max-epochs', '1', '--max-iters', '3',
                 '--dota-iou-thrs', '0.5', '0.75', '1'],
     dict(budgets=['2%', '500K'], jobs=2, gpus=2, port=29501, max_epochs=1, max_iters=3,
          dota_iou_thrs=[0.5, 0.75, 1.0])),
    ('estimate_memory', [TINY_COCO, '--gpus', '1', '8', '--table', '--device-gib', '40.5'],
     dict(gpus=[1, 8], device_gib=40.5)),
    ('benchmark', ['--batch', '2', '--size', '32', '--rounds', '1', '--warmup', '0',
                   '--threads', '1'], dict(batch=2, size=32, rounds=1, warmup=0, threads=1)),
    ('make_tiny_data', ['--num-train', '4', '--num-val', '2', '--seed', '0'],
     dict(num_train=4, num_val=2, seed=0)),
]


@pytest.mark.parametrize('tool,argv,expected', GOOD, ids=[g[0] for g in GOOD])
def test_valid_values_parse_as_before(tool, argv, expected):
    args = importlib.import_module(f'flora_mm.cli.{tool}').parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_defaults_are_unchanged():
    from flora_mm.cli import benchmark, compare, estimate_memory, make_tiny_data
    from flora_mm.harness.compare import DOTA_IOU_THRS
    args = compare.parse_args([TINY_COCO])
    assert (args.gpus, args.jobs, args.port, args.max_epochs, args.max_iters) == \
        (1, 1, 29500, None, None)
    assert args.dota_iou_thrs == DOTA_IOU_THRS and args.budgets is None
    args = benchmark.parse_args([])
    assert (args.batch, args.size, args.rounds, args.warmup, args.threads) == (8, 224, 6, 2, None)
    assert estimate_memory.parse_args([TINY_COCO]).gpus == [1]
    assert estimate_memory.parse_args([TINY_COCO]).device_gib == 80.0
    args = make_tiny_data.parse_args([])
    assert (args.seed, args.num_train, args.num_val) == (0, 24, 8)


@pytest.mark.parametrize('budget', ['1e400', '1e300G', float('nan'), float('inf'), 10 ** 400,
                                    -1.0, 0, 'inf', 'nan'])
def test_parse_budget_refuses_non_finite(budget):
    with pytest.raises(B.BudgetError, match='budget'):
        B.parse_budget(budget)


def test_parse_budget_still_reads_budgets():
    assert B.parse_budget('12.9M').value == pytest.approx(12.9e6)
    assert B.parse_budget('1e300').value == 1e300  # huge but finite: the solver says too large
    assert B.parse_budget(1e6).value == 1e6
    assert B.parse_budget('0.66%').relative


def test_validators():
    assert A.positive_int('3') == 3 and A.nonnegative_int('0') == 0 and A.port('65535') == 65535
    assert A.finite_float(gt=0)('1e-9') == 1e-9
    for bad in ('0', '-2', '1.0', 'x', str(A.INT_MAX + 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            A.positive_int(bad)
    for bad in ('nan', 'inf', '-inf', '1e400', '0', 'x'):
        with pytest.raises(argparse.ArgumentTypeError, match='finite number > 0'):
            A.finite_float(gt=0)(bad)
    assert A.budget('2%') == '2%'
    with pytest.raises(argparse.ArgumentTypeError, match='finite'):
        A.budget('1e400')


def test_count_params_budget_overflow_is_a_usage_error(tmp_path):
    """The reported bug: --budget 1e400 ended in an OverflowError traceback (the rank search
    on an infinite target); now argparse refuses it before any model is built."""
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools/count_params.py'), TINY_COCO,
                           '--budget', '1e400'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'argument --budget: budget must be a finite number' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('tool', TOOLS)
def test_every_tool_has_parse_args_and_main(capsys, tool):
    cli = importlib.import_module(f'flora_mm.cli.{tool}')
    assert callable(cli.main)
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(['--help'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage:')
    shell = open(osp.join(ROOT, 'tools', f'{tool}.py')).read()
    assert f'from flora_mm.cli.{tool} import main' in shell  # tools/ is a thin shell


# ----------------------------------------------------------------------------- launch
def test_tool_command_single_process():
    assert launch.tool_command('train', ['c.py', '--amp'], python='py') == \
        ['py', '-m', 'flora_mm.cli.train', 'c.py', '--amp']


def test_tool_command_several_processes_is_dist_train_sh():
    """What tools/dist_train.sh / dist_test.sh run, with their environment and defaults."""
    cmd = launch.tool_command('train', ['c.py', '--work-dir', 'w'], python='py', gpus=2,
                              env={})
    assert cmd == ['py', '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
                   '--master_addr=127.0.0.1', '--nproc_per_node=2', '--master_port=29500',
                   '-m', 'flora_mm.cli.train', 'c.py', '--launcher', 'pytorch',
                   '--work-dir', 'w']
    env = dict(NNODES='2', NODE_RANK='1', PORT='29600', MASTER_ADDR='10.0.0.1',
               PYTHON='/opt/py')
    cmd = launch.tool_command('test', ['c.py', 'ckpt.pth', '--work-dir', 't'], python='py',
                              gpus=4, env=env)
    assert cmd == ['/opt/py', '-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
                   '--master_addr=10.0.0.1', '--nproc_per_node=4', '--master_port=29600',
                   '-m', 'flora_mm.cli.test', 'c.py', 'ckpt.pth', '--launcher', 'pytorch',
                   '--work-dir', 't']
    with pytest.raises(ValueError):
        launch.tool_command('compare', [], gpus=2)


def test_child_env_imports_this_flora_mm(tmp_path):
    root = launch.package_root()
    env = launch.child_env({'PYTHONPATH': f'/elsewhere{os.pathsep}{root}'}, str(tmp_path))
    if launch.is_installed():
        assert env['PYTHONPATH'] == f'/elsewhere{os.pathsep}{root}'
    else:  # first, once
        assert env['PYTHONPATH'].split(os.pathsep) == [root, '/elsewhere']
    assert 'PYTHONSAFEPATH' not in env
    (tmp_path / 'flora_mm').mkdir()  # a working folder with another flora_mm
    (tmp_path / 'flora_mm' / '__init__.py').write_text("raise ImportError('the other one')\n")
    assert launch.child_env({}, str(tmp_path))['PYTHONSAFEPATH'] == '1'
    code = 'import flora_mm, os; print(os.path.dirname(os.path.abspath(flora_mm.__file__)))'
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                          text=True, env=launch.child_env(None, str(tmp_path)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert osp.samefile(proc.stdout.strip(), osp.dirname(flora_mm.__file__))
