"""Multi-node and slurm launches, on one machine (gloo on the CPU, 1 process per "node").

Two nodes: tools/dist_train.sh started twice (``NNODES=2``, ``NODE_RANK=0/1``,
``MASTER_ADDR=127.0.0.1``, one free ``PORT``, 1 process each; torchrun's static rendezvous,
node 0's agent serves the store) trains the tiny InternViT ADE20K config sharded
(configs/_base_/fsdp.py) for 2 iterations, then ``--resume`` continues it to 4, again as two
nodes. Both launches of each run must exit 0, the log must show world size 2, the checkpoints
must load, and the resumed run must end with the weights (and AdamW state) of an uninterrupted
4-iteration run of tools/dist_train.sh on one node with 2 processes and the same seed, bit for
bit.

Slurm: tools/slurm_train.sh / slurm_test.sh run under a FAKE ``srun`` and a FAKE ``scontrol``,
small scripts this test writes into tmp_path and puts first on PATH. They are test fixtures
standing in for the cluster (there is no slurm here), not part of flora_mm: the fake srun starts
``--ntasks`` local processes with the variables a slurm job step sets (SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NNODES, SLURM_NODELIST, SLURM_JOB_ID, ...),
kills the rest when one fails (``--kill-on-bad-exit=1``) and records its options; the fake
scontrol answers ``show hostname NODELIST`` with loopback addresses. What runs inside is the
real tools/train.py / test.py with ``--launcher slurm``: flora_mm sets up the environment by
mmengine's slurm rules (``flora_mm.apis.config.slurm_environment``: rank, world size, master
address from scontrol) and starts gloo itself, as mmengine's own slurm init would first call
``torch.cuda.set_device``. A 2-task run trains 2 iterations sharded and slurm_test.sh evaluates
its checkpoint with 2 tasks.

Every launch runs in its own process group (its own session); a ``finally`` kills all of them,
so a failed or hung launch leaves no process behind.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate_ade20k
from flora_mm.harness.launch import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
TINY = osp.join(ROOT, 'configs/ade20k/tiny/internvit6b_flora_r16.py')
FRAGMENT = osp.join(ROOT, 'configs/_base_/fsdp.py')
OPTIONS = ['train_dataloader.batch_size=2', 'train_cfg.val_interval=1000',
           'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
           'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', 'randomness.seed=7']
TIMEOUT = 300


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    for key in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'NNODES',
                'NODE_RANK', 'PORT') + tuple(k for k in os.environ if k.startswith('SLURM_')):
        env.pop(key, None)
    env.update(extra)
    return env


def _launch_together(launches: list[tuple[list[str], dict]], cwd, logs: list) -> list[str]:
    """Start every command at once, each in its own session; wait for all; return their logs.

    Asserts every one exited 0; the message puts the launches that failed by themselves first.
    Whatever still runs at the end (after another launch failed, a hang, the timeout) is
    killed with its whole process group."""
    procs, killed, timed_out = [], set(), False
    try:
        for i, (cmd, env) in enumerate(launches):
            log = open(logs[i], 'w')
            procs.append((subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True),
                          log))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # a node that failed leaves the other one waiting for it: stop
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
    finally:
        for i, (proc, log) in enumerate(procs):
            if proc.poll() is None:
                killed.add(i)
            try:  # the group: torchrun's workers, the fake srun's tasks
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            log.close()
    texts = [open(path).read() for path in logs[:len(procs)]]
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        failed.sort(key=lambda i: i in killed)
        why = {True: f'killed ({"timeout" if timed_out else "another launch failed"})',
               False: 'failed'}
        raise AssertionError('\n\n'.join(
            f'{launches[i][0]} -> {procs[i][0].returncode}, {why[i in killed]}\n'
            f'{texts[i][-6000:]}' for i in failed))
    return texts


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('multinode')
    generate_ade20k(str(tmp / 'data/tiny'), num_train=8, num_val=2)
    generate_checkpoints(str(tmp / 'data/tiny'))
    config = tmp / 'tiny_internvit_flora_fsdp.py'
    config.write_text(f'_base_ = [{TINY!r}, {FRAGMENT!r}]\n')
    return tmp, config


def _dist_train(config, work, procs: int, iters: int, *extra: str) -> list[str]:
    return ['bash', osp.join(TOOLS, 'dist_train.sh'), str(config), str(procs), '--work-dir',
            str(work), *extra, '--cfg-options', *OPTIONS, f'train_cfg.max_iters={iters}']


def _two_nodes(tmp, cmd: list[str], name: str) -> list[str]:
    port = str(free_port())
    launches = [(cmd, _env(NNODES='2', NODE_RANK=str(node), MASTER_ADDR='127.0.0.1', PORT=port))
                for node in (0, 1)]
    return _launch_together(launches, tmp, [tmp / f'{name}_node{n}.log' for n in (0, 1)])


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.dist
def test_two_nodes_train_and_resume_equal_one_node(data):
    tmp, config = data
    work = tmp / 'two_nodes'
    first = _two_nodes(tmp, _dist_train(config, work, 1, 2), 'first')
    assert 'GPU number: 2' in first[0] and 'Distributed launcher: pytorch' in first[0], \
        first[0][-4000:]
    assert (work / 'iter_2.pth').is_file() and not (work / 'iter_4.pth').exists()
    resumed = _two_nodes(tmp, _dist_train(config, work, 1, 4, '--resume'), 'resumed')
    assert 'GPU number: 2' in resumed[0]
    assert 'resumed epoch: 0, iter: 2' in resumed[0], resumed[0][-4000:]

    ref_work = tmp / 'one_node'
    _launch_together([(_dist_train(config, ref_work, 2, 4), _env(PORT=str(free_port())))],
                     tmp, [tmp / 'one_node.log'])

    for it in (2, 4):
        got, ref = _load(work / f'iter_{it}.pth'), _load(ref_work / f'iter_{it}.pth')
        assert got['meta']['iter'] == it and got['meta']['sharded']['world_size'] == 2
        assert got['state_dict'].keys() == ref['state_dict'].keys()
        for key, value in ref['state_dict'].items():
            torch.testing.assert_close(got['state_dict'][key], value, rtol=0, atol=0,
                                       msg=f'iter {it}: {key}')
        assert {int(s['step']) for s in got['optimizer']['state'].values()} == {it}
        for name, state in ref['optimizer']['state'].items():
            for k, v in state.items():
                torch.testing.assert_close(got['optimizer']['state'][name][k], v, rtol=0,
                                           atol=0, msg=f'iter {it}: optimizer {name}.{k}')
    # the run trained: FLoRA cores start at zero and moved between the two halves
    before, after = _load(work / 'iter_2.pth'), _load(work / 'iter_4.pth')
    cores = [k for k in after['state_dict'] if k.endswith('flora_core')]
    assert cores and all(after['state_dict'][k].abs().max() > 0 for k in cores)
    assert any(not torch.equal(after['state_dict'][k], before['state_dict'][k]) for k in cores)


# --------------------------------------------------------------------------- slurm
FAKE_SRUN = '''#!{python}
"""FAKE srun (test fixture, not slurm): runs --ntasks local copies of the command."""
import json, os, subprocess, sys, time
args, opts, i = sys.argv[1:], {{}}, 0
while i < len(args) and args[i].startswith('-'):
    if '=' in args[i]:
        key, value = args[i].split('=', 1)
    elif args[i] in ('-p', '--partition', '-J', '--job-name', '-n', '--ntasks', '-N', '-c'):
        key, value = args[i], args[i + 1]
        i += 1
    else:
        key, value = args[i], ''
    opts[key] = value
    i += 1
command = args[i:]
with open(os.environ['FAKE_SRUN_LOG'], 'a') as log:
    log.write(json.dumps(dict(opts=opts, command=command)) + '\\n')
ntasks = int(opts.get('--ntasks', opts.get('-n', 1)))
per_node = int(opts.get('--ntasks-per-node', ntasks))
nnodes = -(-ntasks // per_node)
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_NODEID=str(rank // per_node), SLURM_NTASKS=str(ntasks),
               SLURM_NNODES=str(nnodes), SLURM_NODELIST=f'fakenode[0-{{nnodes - 1}}]',
               SLURM_JOB_ID='4242', SLURM_STEP_ID='0',
               SLURM_JOB_NAME=opts.get('--job-name', opts.get('-J', 'job')))
    procs.append(subprocess.Popen(command, env=env))
rc = 0
while any(p.poll() is None for p in procs):
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and opts.get('--kill-on-bad-exit') == '1':
        for p in procs:
            if p.poll() is None:
                p.kill()
        break
    time.sleep(0.2)
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c != 0), 0) and 1)
'''

FAKE_SCONTROL = '''#!/bin/sh
# FAKE scontrol (test fixture, not slurm): `show hostname LIST` names loopback "nodes"
echo "$@" >> "$FAKE_SCONTROL_LOG"
if [ "$1" = show ] && [ "$2" = hostname ]; then
    echo 127.0.0.1
    echo 127.0.0.2
    exit 0
fi
echo "fake scontrol: unsupported: $*" >&2
exit 1
'''


@pytest.fixture()
def fake_slurm(tmp_path):
    """A bin folder with the fake srun / scontrol, and the environment that puts it first."""
    bin_dir = tmp_path / 'fake_slurm_bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / 'scontrol').write_text(FAKE_SCONTROL)
    for name in ('srun', 'scontrol'):
        (bin_dir / name).chmod(0o755)
    return dict(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                FAKE_SRUN_LOG=str(tmp_path / 'srun_calls.jsonl'),
                FAKE_SCONTROL_LOG=str(tmp_path / 'scontrol_calls.txt'))


@pytest.mark.dist
def test_slurm_train_and_test_two_tasks(data, fake_slurm, tmp_path):
    tmp, config = data
    work = tmp / 'slurm'
    env = _env(GPUS='2', GPUS_PER_NODE='1', CPUS_PER_TASK='1', MASTER_PORT=str(free_port()),
               **fake_slurm)
    train = ['bash', osp.join(TOOLS, 'slurm_train.sh'), 'cpu', 'flora_tiny', str(config),
             str(work), '--cfg-options', *OPTIONS, 'train_cfg.max_iters=2']
    log, = _launch_together([(train, env)], tmp, [tmp_path / 'slurm_train.log'])
    assert 'GPU number: 2' in log and 'Distributed launcher: slurm' in log, log[-4000:]
    ckpt = _load(work / 'iter_2.pth')
    assert ckpt['meta']['iter'] == 2 and ckpt['meta']['sharded']['world_size'] == 2
    cores = [k for k in ckpt['state_dict'] if k.endswith('flora_core')]
    assert cores and all(ckpt['state_dict'][k].abs().max() > 0 for k in cores)

    env = dict(env, GRES='', MASTER_PORT=str(free_port()))
    test = ['bash', osp.join(TOOLS, 'slurm_test.sh'), 'cpu', 'flora_tiny_test', str(config),
            str(work / 'iter_2.pth'), '--work-dir', str(tmp / 'slurm_test')]
    log, = _launch_together([(test, env)], tmp, [tmp_path / 'slurm_test.log'])
    assert 'mIoU' in log and 'Distributed launcher: slurm' in log and 'GPU number: 2' in log, \
        log[-4000:]

    calls = [json.loads(line) for line in open(fake_slurm['FAKE_SRUN_LOG'])]
    assert len(calls) == 2
    for call, job, tool in zip(calls, ('flora_tiny', 'flora_tiny_test'), ('train', 'test')):
        opts = call['opts']
        assert opts['-p'] == 'cpu' and opts['--job-name'] == job
        assert opts['--ntasks'] == '2' and opts['--ntasks-per-node'] == '1'
        assert opts['--cpus-per-task'] == '1' and opts['--kill-on-bad-exit'] == '1'
        assert call['command'][:3] == [sys.executable, '-u', osp.join(TOOLS, f'{tool}.py')]
        assert '--launcher=slurm' in call['command']
    assert calls[0]['opts']['--gres'] == 'gpu:1' and '--gres' not in calls[1]['opts']
    # each task asked scontrol for the first node's address (no MASTER_ADDR was set)
    scontrol = open(fake_slurm['FAKE_SCONTROL_LOG']).read().splitlines()
    assert scontrol == ['show hostname fakenode[0-1]'] * 4


def test_slurm_environment_rules(fake_slurm, monkeypatch):
    """mmengine's slurm rules without a process group: errors name what is missing."""
    from flora_mm.apis.config import slurm_environment
    for key in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK',
                'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST', 'SLURM_LOCALID'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST not set'):
        slurm_environment()
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_NODELIST', 'fakenode[0-1]')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('PATH', os.pathsep.join(p for p in os.environ['PATH'].split(os.pathsep)
                                               if not osp.isfile(osp.join(p, 'scontrol'))))
    with pytest.raises(RuntimeError, match=r'scontrol show hostname fakenode\[0-1\]` failed'):
        slurm_environment()
    for key, value in fake_slurm.items():
        monkeypatch.setenv(key, value)
    assert slurm_environment() == dict(MASTER_ADDR='127.0.0.1', MASTER_PORT='29500',
                                       WORLD_SIZE='4', RANK='3', LOCAL_RANK='1')
    monkeypatch.setenv('MASTER_ADDR', '10.1.2.3')  # the environment's wins, as in mmengine
    assert slurm_environment(port=1234)['MASTER_ADDR'] == '10.1.2.3'
    assert os.environ['MASTER_PORT'] == '1234'


@pytest.mark.parametrize('script,needed', [
    ('dist_train.sh', 'CONFIG and GPUS'), ('dist_test.sh', 'CONFIG, CHECKPOINT and GPUS'),
    ('slurm_train.sh', 'PARTITION, JOB_NAME, CONFIG and WORK_DIR'),
    ('slurm_test.sh', 'PARTITION, JOB_NAME, CONFIG and CHECKPOINT')])
def test_scripts_without_arguments_print_usage(script, needed):
    proc = subprocess.run(['bash', osp.join(TOOLS, script), 'only_one'], capture_output=True,
                          text=True, timeout=30, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.startswith('usage:') and f'{needed}' in proc.stderr, proc.stderr


def test_a_failed_launch_stops_the_others(tmp_path):
    """The harness above: one launch fails, the other (a process with a child, as torchrun
    with its workers) is killed with its whole group, quickly, and the failure is reported."""
    pid_file = tmp_path / 'child.pid'
    waiting = ['sh', '-c', f'sleep 300 & echo $! > {pid_file}; wait']
    failing = ['sh', '-c', f'while [ ! -s {pid_file} ]; do sleep 0.1; done; echo broken; exit 3']
    start = time.monotonic()
    expected = r'-> 3, failed\nbroken\n(.|\n)*-> -9, killed \(another launch failed\)'
    with pytest.raises(AssertionError, match=expected):
        _launch_together([(waiting, _env()), (failing, _env())], tmp_path,
                         [tmp_path / 'a.log', tmp_path / 'b.log'])
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILLed, then reaped by init (a zombie meanwhile)
        try:
            with open(f'/proc/{child}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f'child {child} of the killed launch still runs')
