"""Sharded checkpoints in torch's DCP format from FSDPRunner (``model_wrapper_cfg.save_format=
'dcp'``; issue 24 item 2): the tiny InternViT ADE20K config + configs/_base_/fsdp.py, gloo on
the CPU. The runs are shared by every test (module fixture; tests/_dcp_worker.py runs several
Runners per process group, so each world size pays the start of torch / mmengine once):

- 2 processes: FLoRA 4 iterations with 'dcp' (checkpoints at 2 and 4) and 2 iterations of the
  same run with the gathered format ('full'); FLoRA resumed from the 'dcp' checkpoint of
  iteration 2; Full fine-tuning 2 iterations with 'dcp', a checkpoint each, max_keep_ckpts=1;
  a resume from a copy of a directory with a shard file missing (must fail on every rank,
  naming it); a save that a hook fails on one rank (nothing written on any rank).
- 3 processes: FLoRA loaded from the 2-process directory; Full auto-resumed in its work dir,
  one more iteration; tools/test.py's function on the FLoRA directory (sharded).
- 1 process without a launcher (unsharded): FLoRA resumed from the 2-process directory, one
  more iteration; tools/test.py's function on the directory.

What is compared: the directory against the gathered file of the same run (every tensor and
optimizer entry equal), the adapter files byte for byte, the resumed run against the
uninterrupted one (losses and final weights bitwise), the state right after loading on 1 and 3
processes against the saved one.
"""
from __future__ import annotations

import glob
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys

import pytest
import torch

from flora_mm.checkpoint import CheckpointError, dcp_to_file, load_checkpoint_file
from flora_mm.checkpoint.dcp import EXTRA_STATE, METADATA, read_dcp_metadata
from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate_ade20k
from flora_mm.harness.launch import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(ROOT, 'configs/ade20k/tiny/internvit6b_flora_r16.py')
FRAGMENT = osp.join(ROOT, 'configs/_base_/fsdp.py')
WORKER = osp.join(ROOT, 'tests/_dcp_worker.py')


def _run(cmd: list[str], cwd, timeout: int = 500) -> str:
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def _launch(tmp, procs: int | None, plan: list[dict], tag: str) -> str:
    plan_file = tmp / f'plan_{tag}.json'
    plan_file.write_text(json.dumps(plan))
    if procs is None:  # no launcher: the unsharded Runner
        cmd = [sys.executable, WORKER, str(plan_file), str(tmp / 'results')]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={procs}',
               f'--master_port={free_port()}', WORKER, str(plan_file), str(tmp / 'results')]
    return _run(cmd, tmp)


def _options(iters: int, dcp: bool = True, **extra) -> dict:
    options = {'randomness.seed': 3, 'train_dataloader.batch_size': 2,
               'train_cfg.max_iters': iters, 'train_cfg.val_interval': 1000,
               'default_hooks.checkpoint.interval': 2, 'default_hooks.logger.interval': 1,
               'log_level': 'WARNING', 'val_cfg': None, 'val_dataloader': None,
               'val_evaluator': None}
    if dcp:
        options['model_wrapper_cfg.save_format'] = 'dcp'
    options.update(extra)
    return options


FULL = dict(type='Full')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('dcp_fsdp')
    generate_ade20k(str(tmp / 'data/tiny'), num_train=8, num_val=2)
    generate_checkpoints(str(tmp / 'data/tiny'))
    config = tmp / 'tiny_internvit_flora_fsdp.py'
    config.write_text(f'_base_ = [{TINY!r}, {FRAGMENT!r}]\n')
    (tmp / 'results').mkdir()
    c, w = str(config), lambda name: str(tmp / name)
    keep_one = {'default_hooks.checkpoint.interval': 1,
                'default_hooks.checkpoint.max_keep_ckpts': 1}
    logs = [_launch(tmp, 2, [
        dict(name='flora_dcp', config=c, work_dir=w('flora_dcp'),
             options=_options(4, **{'default_hooks.checkpoint.published_keys':
                                    ['meta', 'state_dict']})),
        dict(name='flora_full', config=c, work_dir=w('flora_full'), options=_options(2, False)),
        dict(name='flora_resumed', config=c, work_dir=w('flora_resumed'), options=_options(4),
             resume=w('flora_dcp/iter_2.pth')),
        dict(name='full_dcp', config=c, work_dir=w('full_dcp'), peft=FULL,
             options=_options(2, **keep_one)),
        # a copy of the first run's directory with a shard file missing
        dict(name='broken_2', config=c, work_dir=w('broken_2'), options=_options(5),
             copy_without=[w('flora_dcp/iter_2.pth'), w('broken/iter_2.pth'), '__1_0.distcp'],
             resume=w('broken/iter_2.pth'), expect_error=True),
        # a checkpoint hook fails on rank 1 only: nothing may be written, no rank may hang
        dict(name='fail_save_2', config=c, work_dir=w('fail_save_2'), fail_save_on_rank=1,
             options=_options(1, **{'default_hooks.checkpoint.interval': 1}),
             expect_error=True),
    ], '2')]
    # what the 3-process runs overwrite, kept aside
    shutil.copytree(tmp / 'full_dcp/iter_2.pth', tmp / 'saved/full_iter_2.pth')
    logs.append(_launch(tmp, 3, [
        # loaded and resharded, no iteration (max_iters = the checkpoint's)
        dict(name='flora_3', config=c, work_dir=w('flora_3'), options=_options(2),
             resume=w('flora_dcp/iter_2.pth'), dump=True),
        # auto-resume in the Full run's work dir, one more iteration saved
        dict(name='full_3', config=c, work_dir=w('full_dcp'), peft=FULL, resume='auto',
             options=_options(3, **keep_one), dump=True),
        # tools/dist_test.sh's path: load_from into the meta-started sharded model
        dict(name='test_3', kind='test', config=c, work_dir=w('test_3'),
             checkpoint=w('flora_dcp/iter_4.pth')),
    ], '3'))
    logs.append(_launch(tmp, None, [
        dict(name='flora_1', config=c, work_dir=w('flora_1'), options=_options(3),
             resume=w('flora_dcp/iter_2.pth'), dump=True),
        # what tools/test.py runs (flora_mm.apis.test), one process, on the directory
        dict(name='test_1', kind='test', config=c, work_dir=w('test_1'),
             checkpoint=w('flora_dcp/iter_4.pth')),
    ], '1'))
    print('\n'.join(line for log in logs for line in log.splitlines()
                    if line.startswith('_dcp_worker:')))
    return tmp, config


def _result(tmp, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / 'results' / f'{name}_rank{rank}.pt', weights_only=False)


def _gathered(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert torch.equal(value, b[key]), f'{what}: {key}'


def _assert_same_optimizer(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    for name, entries in a.items():
        assert entries.keys() == b[name].keys(), (what, name)
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[name][key])), \
                f'{what}: {name}.{key}'


def test_dcp_directories_written_by_every_rank(runs):
    tmp, _ = runs
    work = tmp / 'flora_dcp'
    for step in (2, 4):
        ckpt = work / f'iter_{step}.pth'
        assert ckpt.is_dir()
        assert sorted(os.listdir(ckpt)) == sorted([METADATA, EXTRA_STATE, '__0_0.distcp',
                                                   '__1_0.distcp'])
    assert not glob.glob(str(work / '.tmp-*'))
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'iter_4.pth')
    # each rank wrote its own rows of a sharded weight: two chunks, one per shard file
    metadata = read_dcp_metadata(str(work / 'iter_4.pth'))
    key = 'state_dict.backbone.blocks.0.attn.qkv.weight'
    chunks = metadata.state_dict_metadata[key].chunks
    assert len(chunks) == 2 and chunks[0].offsets[0] == 0 and chunks[1].offsets[0] > 0
    files = {info.relative_path for index, info in metadata.storage_data.items()
             if index.fqn == key}
    assert files == {'__0_0.distcp', '__1_0.distcp'}
    # the rest: plain values, read with weights_only=True
    extra = torch.load(work / 'iter_4.pth' / EXTRA_STATE, weights_only=True)
    assert extra['meta']['iter'] == 4 and extra['meta']['seed'] == 3
    assert extra['meta']['sharded'] == dict(strategy='fsdp2', world_size=2, format='dcp',
                                            optimizer_keys='parameter names')
    assert 'rng' in extra['flora_mm'] and extra['param_schedulers']
    assert 'state_dict' not in extra and 'optimizer' not in extra
    # CheckpointHook's published file (published_keys) is read from the directory
    published = glob.glob(str(work / 'iter_4-*.pth'))
    assert len(published) == 1
    whole = load_checkpoint_file(str(work / 'iter_4.pth'))
    _assert_same_state(_gathered(published[0])['state_dict'], whole['state_dict'], 'published')
    # the adapter file of the Full run gathers the whole model on rank 0: said once
    # (the runs of one worker share mmengine's log handlers, so a log file also holds later
    # runs' lines: every warning logged must be a Full run's, all parameters trained)
    logs = ''.join(open(f).read() for f in glob.glob(str(tmp / '*' / '*' / '*.log')))
    counts = re.findall(r'adapter file gathers every trained tensor on rank 0 \(([\d,]+) of '
                        r'([\d,]+) parameters\)', logs)
    assert counts and all(trained == total for trained, total in counts), counts
    # max_keep_ckpts removes directories (Full run: iteration 1 went when 2 was written)
    assert (tmp / 'saved/full_iter_2.pth').is_dir() and not (tmp / 'full_dcp/iter_1.pth').exists()


def test_dcp_equals_gathered_format_and_converts(runs):
    """The same run saved both ways (iteration 2): every tensor and optimizer entry equal (the
    buffers FSDP keeps per rank, BN's running stats, are rank 0's in both); the directory
    converted to one file (tools/dcp_to_pth.py) holds what the gathered format writes."""
    tmp, _ = runs
    gathered = _gathered(tmp / 'flora_full/iter_2.pth')
    whole = load_checkpoint_file(str(tmp / 'flora_dcp/iter_2.pth'))
    _assert_same_state(whole['state_dict'], gathered['state_dict'], 'model')
    _assert_same_optimizer(whole['optimizer']['state'], gathered['optimizer']['state'],
                           'optimizer')
    assert whole['optimizer']['param_groups'] == gathered['optimizer']['param_groups']
    assert {int(s['step']) for s in whole['optimizer']['state'].values()} == {2}
    # frozen base weights have no optimizer state, trained ones all have it
    trained = {k for k in gathered['state_dict'] if k.endswith('flora_core')}
    assert trained and trained <= whole['optimizer']['state'].keys()
    assert 'backbone.blocks.0.attn.qkv.weight' in whole['state_dict']
    assert 'backbone.blocks.0.attn.qkv.weight' not in whole['optimizer']['state']
    # the gathered-format run trained the same (the format does not touch training)
    assert _result(tmp, 'flora_full')['losses'] == _result(tmp, 'flora_dcp')['losses'][:2]
    # the conversion tool
    from flora_mm.cli.dcp_to_pth import main
    out = tmp / 'converted/iter_2.pth'
    main([str(tmp / 'flora_dcp/iter_2.pth'), str(out)])
    converted = _gathered(out)
    _assert_same_state(converted['state_dict'], gathered['state_dict'], 'converted')
    _assert_same_optimizer(converted['optimizer']['state'], gathered['optimizer']['state'],
                           'converted optimizer')
    assert converted['meta']['iter'] == 2 and converted['message_hub']
    with pytest.raises(SystemExit, match='exists'):
        main([str(tmp / 'flora_dcp/iter_2.pth'), str(out)])
    with pytest.raises(FileNotFoundError, match='not a DCP checkpoint directory'):
        dcp_to_file(str(tmp / 'flora_full/iter_2.pth'), str(tmp / 'converted/x.pth'))


def test_adapter_file_identical_to_gathered_format(runs):
    tmp, _ = runs
    from safetensors.torch import load_file
    dcp_file = tmp / 'flora_dcp/iter_2_adapter.safetensors'
    assert dcp_file.read_bytes() == (tmp / 'flora_full/iter_2_adapter.safetensors').read_bytes()
    tensors = load_file(str(dcp_file))
    state = load_checkpoint_file(str(tmp / 'flora_dcp/iter_2.pth'))['state_dict']
    assert any(k.endswith('flora_core') for k in tensors)
    for key, value in tensors.items():
        assert torch.equal(value, state[key]), key
    sidecar = json.loads((tmp / 'flora_dcp/iter_2_adapter.json').read_text())
    assert sidecar['meta']['checkpoint'] == 'iter_2.pth' and sidecar['meta']['iter'] == 2


def test_resume_two_processes_is_exact(runs):
    """Resumed from the 'dcp' checkpoint of iteration 2 == the run that was not interrupted:
    same losses (rank 0) and the same tensors at iteration 4, bit for bit."""
    tmp, _ = runs
    straight, resumed = _result(tmp, 'flora_dcp'), _result(tmp, 'flora_resumed')
    assert len(straight['losses']) == 4
    assert resumed['losses'] == straight['losses']
    a = load_checkpoint_file(str(tmp / 'flora_dcp/iter_4.pth'))
    b = load_checkpoint_file(str(tmp / 'flora_resumed/iter_4.pth'))
    _assert_same_state(b['state_dict'], a['state_dict'], 'resumed model')
    _assert_same_optimizer(b['optimizer']['state'], a['optimizer']['state'], 'resumed optim')
    assert ((tmp / 'flora_resumed/iter_4_adapter.safetensors').read_bytes()
            == (tmp / 'flora_dcp/iter_4_adapter.safetensors').read_bytes())


@pytest.mark.parametrize('name,source', [('flora_3', 'flora_dcp/iter_2.pth'),
                                         ('full_3', 'saved/full_iter_2.pth'),
                                         ('flora_1', 'flora_dcp/iter_2.pth')])
def test_resume_on_another_world_size(runs, name, source):
    """Loaded on 3 processes (resharded by DCP) and on 1 without a launcher (unsharded,
    the directory read whole): the model and optimizer state right after loading are the
    saved ones, and training goes on from there."""
    tmp, _ = runs
    saved = load_checkpoint_file(str(tmp / source))
    dump = _result(tmp, name)['dump']
    assert dump['sharded'] == (name != 'flora_1')
    assert dump['world_size'] == (1 if name == 'flora_1' else 3)
    assert dump['iter'] == saved['meta']['iter'] == 2
    _assert_same_state(dump['state_dict'], saved['state_dict'], f'{name} model')
    _assert_same_optimizer(dump['optimizer'], saved['optimizer']['state'], f'{name} optim')
    if name == 'flora_3':
        return  # loaded only
    # one more iteration, saved (3 processes: DCP, world size 3; 1 process: a plain file)
    work = tmp / ('full_dcp' if name == 'full_3' else name)
    after = load_checkpoint_file(str(work / 'iter_3.pth'))
    assert {int(s['step']) for s in after['optimizer']['state'].values()} == {3}
    if name == 'full_3':  # every weight trained; auto-resume found the directory, and
        # max_keep_ckpts went on from the resumed run's list
        assert 'backbone.blocks.0.attn.qkv.weight' in after['optimizer']['state']
        assert (work / 'iter_3.pth').is_dir() and after['meta']['sharded']['world_size'] == 3
        assert (work / 'last_checkpoint').read_text().strip() == str(work / 'iter_3.pth')
        assert not (work / 'iter_2.pth').exists()
    else:
        assert (work / 'iter_3.pth').is_file()


def test_damaged_directory_errors_name_the_file(runs):
    tmp, _ = runs
    for rank in range(2):  # the resume failed on every rank, naming the file
        error = _result(tmp, 'broken_2', rank)['error']
        assert 'shard file __1_0.distcp is missing' in error, error
    damaged = tmp / 'damaged/iter_4.pth'
    shutil.copytree(tmp / 'flora_dcp/iter_4.pth', damaged)
    shard = damaged / '__0_0.distcp'
    shard.write_bytes(b'\x00' * shard.stat().st_size)  # same size: only reading it shows it
    with pytest.raises(CheckpointError, match=r'shard file .*__0_0\.distcp.*corrupt'):
        load_checkpoint_file(str(damaged))


def test_failed_save_writes_nothing_on_any_rank(runs):
    """A before_save_checkpoint hook failing on rank 1 only: both ranks stop with an error
    naming it, and neither the directory, nor its adapter files (staged on rank 0), nor a
    temporary directory is left."""
    tmp, _ = runs
    assert _result(tmp, 'fail_save_2', 1)['error'] == \
        'RuntimeError: injected failure on rank 1'
    error = _result(tmp, 'fail_save_2', 0)['error']
    assert 'iter_1.pth not written: rank 1 failed before saving' in error, error
    assert 'injected failure on rank 1' in error
    left = sorted(p for p in os.listdir(tmp / 'fail_save_2') if not p[0].isdigit())
    assert left == ['tiny_internvit_flora_fsdp.py'], left  # the log folder and the config


def test_bad_save_format_is_refused():
    from mmengine.config import Config

    from flora_mm.engine.fsdp import FSDPRunner, FullyShardedModel
    cfg = Config(dict(model=dict(type='NotBuilt'), work_dir='/nonexistent',
                      model_wrapper_cfg=dict(type='FullyShardedModel', save_format='zip')))
    with pytest.raises(ValueError, match=r"save_format must be one of \['dcp', 'full'\].*'zip'"):
        FSDPRunner.from_cfg(cfg)
    with pytest.raises(ValueError, match='save_format'):
        FullyShardedModel(torch.nn.Linear(2, 2), save_format='DCP')


def test_test_tool_reads_the_directory(runs):
    """tools/test.py's function (flora_mm.apis.test) on the 2-process directory: in one
    process (unsharded, the directory read whole) and on 3 (tools/dist_test.sh: sharded,
    loaded into the shards): the same predictions, the same metrics."""
    tmp, _ = runs
    one, three = _result(tmp, 'test_1')['metrics'], _result(tmp, 'test_3')['metrics']
    assert 'mIoU' in one and 0 <= one['mIoU'] <= 100
    assert three == pytest.approx(one, abs=1e-6)
