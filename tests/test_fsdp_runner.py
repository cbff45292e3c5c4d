"""Sharded training through the tools: tools/dist_train.sh with the tiny InternViT ADE20K
config + configs/_base_/fsdp.py (a config switch only), 2 CPU processes with gloo.

Checks what a sharded run leaves behind: the regular checkpoint is complete (every tensor at
its full shape; the frozen base equals the pretrained file, so nothing is a shard), the adapter
file holds every trainable tensor at full shape with the checkpoint's values and loads into an
unsharded model with the same outputs, ``--resume`` continues the run on another world size
(1 process: the gathered checkpoint does not depend on the world size; the optimizer's step
count goes on), and tools/test.py evaluates the checkpoint unsharded.
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate_ade20k
from flora_mm.harness.launch import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(ROOT, 'configs/ade20k/tiny/internvit6b_flora_r16.py')
FRAGMENT = osp.join(ROOT, 'configs/_base_/fsdp.py')


def _run(cmd: list[str], cwd, timeout: int = 400) -> str:
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def _train(tmp_path, config, work, gpus: int, iters: int, extra=()) -> str:
    return _run(['bash', osp.join(ROOT, 'tools/dist_train.sh'), str(config), str(gpus),
                 '--work-dir', str(work), '--cfg-options', 'train_dataloader.batch_size=2',
                 f'train_cfg.max_iters={iters}', 'train_cfg.val_interval=1000',
                 'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
                 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', *extra],
                tmp_path)


@pytest.fixture(scope='module')
def sharded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fsdp_run')
    generate_ade20k(str(tmp / 'data/tiny'), num_train=8, num_val=2)
    generate_checkpoints(str(tmp / 'data/tiny'))
    config = tmp / 'tiny_internvit_flora_fsdp.py'
    config.write_text(f'_base_ = [{TINY!r}, {FRAGMENT!r}]\n')
    work = tmp / 'work'
    log = _train(tmp, config, work, gpus=2, iters=4)
    return tmp, config, work, log


def _build_unsharded(config, tmp):
    """The config's model, built whole on the CPU (pretrained base loaded) — the reference."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from flora_mm.utils import register_task_modules
    cwd = os.getcwd()
    os.chdir(tmp)  # the config's data/tiny paths are relative
    try:
        cfg = Config.fromfile(str(config))
        register_task_modules('mmseg')
        init_default_scope('mmseg')
        model = MODELS.build(cfg.model)
        model.init_weights()
    finally:
        os.chdir(cwd)
    return model.eval()


def test_sharded_checkpoint_is_complete(sharded_run):
    tmp, config, work, log = sharded_run
    assert 'FSDP' in log or 'FullyShardedModel' in log
    ckpt = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    model = _build_unsharded(config, tmp)
    expected = model.state_dict()
    assert ckpt['state_dict'].keys() == expected.keys()
    for key, value in expected.items():
        assert ckpt['state_dict'][key].shape == value.shape, key
    # the frozen base is the pretrained base, value for value (not rank 0's shard)
    pretrained = torch.load(tmp / 'data/tiny/checkpoints/internvit_tiny.pth',
                            weights_only=True)['model']
    compared = 0
    for key, value in pretrained.items():
        saved = ckpt['state_dict'][f'backbone.{key}']
        if saved.shape == value.shape:  # pos_embed is resampled to the crop on load
            torch.testing.assert_close(saved, value, rtol=0, atol=0)
            compared += 1
    assert compared >= len(pretrained) - 1 and compared > 30
    # the adapters trained (FLoRA cores start at zero)
    cores = [k for k in ckpt['state_dict'] if k.endswith('flora_core')]
    assert cores and all(ckpt['state_dict'][k].abs().max() > 0 for k in cores)
    assert ckpt['meta']['sharded']['world_size'] == 2
    steps = {int(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {4}


def test_sharded_adapter_file_complete_and_loads_unsharded(sharded_run):
    from safetensors.torch import load_file

    from flora_mm.peft.io import load_adapter_checkpoint
    tmp, config, work, _ = sharded_run
    ckpt = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    adapter_path = work / 'iter_4_adapter.safetensors'
    tensors = load_file(str(adapter_path))
    model = _build_unsharded(config, tmp)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(value, ckpt['state_dict'][key], rtol=0, atol=0)
    # adapters into a fresh unsharded model == the full sharded checkpoint loaded
    load_adapter_checkpoint(model, str(adapter_path))
    full = _build_unsharded(config, tmp)
    full.load_state_dict(ckpt['state_dict'])
    x = torch.randn(1, 3, 112, 140, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.extract_feat(x)[0], full.extract_feat(x)[0])
        torch.testing.assert_close(model.decode_head(model.extract_feat(x)),
                                   full.decode_head(full.extract_feat(x)))


def _host_memory_records(work) -> dict:
    """{rank: phases} of the newest run under ``work`` that has ``ranks`` files."""
    import json
    runs = {}
    for path in sorted(work.glob('*/host_memory_rank*.json')):
        rank = int(path.stem.rsplit('rank', 1)[1])
        runs.setdefault(path.parent.name, {})[rank] = json.loads(path.read_text())
    return runs


def test_host_memory_phases_recorded(sharded_run):
    """FSDPRunner writes each rank's peak host RSS per phase (start, setup, then train + save
    per checkpoint) to <work_dir>/<timestamp>/host_memory_rank<R>.json; the shard it counts
    at a save is what the planner says rank 0 holds (tools/estimate_memory.py)."""
    from mmengine.config import Config

    from flora_mm.apis.memory import build_meta_model, plan_config
    tmp, config, work, log = sharded_run
    runs = [r for r in _host_memory_records(work).values() if set(r) == {0, 1}]
    assert len(runs) == 1, sorted(p.name for p in work.glob('*/host_memory_rank*.json'))
    ranks = runs[0]
    assert 'host_memory_rank0.json' in log
    for rank, phases in ranks.items():
        assert [p['phase'] for p in phases] == ['start', 'setup', 'train', 'save', 'train',
                                               'save'], phases
        assert [p.get('checkpoint') for p in phases if p['phase'] == 'save'] == [
            'iter_2.pth', 'iter_4.pth']
        start = phases[0]
        assert start['start'] == 'meta-device' and start['rank'] == rank
        # the start's peak counts from the process's start; each later phase from the reset
        assert start['resettable'] is None
        assert all(isinstance(p['resettable'], bool) for p in phases[1:])
        assert start['world_size'] == 2
        for p in phases:  # MiB; a training process holds torch + mmengine + mmseg: > 200 MiB
            assert 200 < p['rss_mib'] <= p['peak_rss_mib'] + 1 < 64 * 1024, p
    cfg = Config.fromfile(str(config))
    plan = plan_config(cfg, gpus=2, model=build_meta_model(cfg))
    shard0 = [p for p in ranks[0] if p['phase'] == 'save'][-1]['shard_bytes']
    # rank 0 holds the first (largest) dim-0 chunk of every parameter: the planner's figures
    assert shard0['params'] == plan.param_bytes
    assert shard0['grads'] == plan.gradients and shard0['optimizer'] == plan.optimizer > 0
    assert ranks[0][0]['shard_bytes']['optimizer'] == 0  # no optimizer state at the start
    shard1 = [p for p in ranks[1] if p['phase'] == 'save'][-1]['shard_bytes']
    assert 0 < shard1['params'] <= shard0['params']


def test_estimate_memory_host_side_matches_measured(sharded_run):
    """tools/estimate_memory.py's host side for this run (the config's meta start and gathered
    save, 2 ranks, shards on the CPU as under gloo; process overhead = the tool's own RSS)
    against the peaks the run recorded: start and save of both ranks within 20 % (the tiny
    model's share is a few MiB: this checks the overhead and the phases' bookkeeping; the
    mid-size model's check is in docs/sharding.md "Host memory")."""
    import json
    tmp, config, work, _ = sharded_run
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools/estimate_memory.py'),
                           str(config), '--gpus', '2', '--host-device', 'cpu', '--json'],
                          cwd=str(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    host = json.loads(proc.stdout)[str(config)]['host']
    assert (host['meta_init'], host['save_format'], host['device']) == (True, 'full', 'cpu')
    ranks = [r for r in _host_memory_records(work).values() if set(r) == {0, 1}][0]
    for rank, key in ((0, 'rank0'), (1, 'other')):
        phases = ranks[rank]
        measured = dict(start=phases[0]['peak_rss_mib'],
                        save=max(p['peak_rss_mib'] for p in phases if p['phase'] == 'save'))
        for phase, value in measured.items():
            projected = host['peaks'][phase][key] / 2**20
            assert abs(projected - value) <= 0.2 * value, (rank, phase, projected, value)


def test_resume_on_another_world_size_and_test_tool(sharded_run):
    tmp, config, work, _ = sharded_run
    log = _train(tmp, config, work, gpus=1, iters=6, extra=('--resume',))
    assert 'resumed epoch: 0, iter: 4' in log, log[-4000:]
    # the resumed run's host memory phases: the checkpoint load is one of them
    resumed = [r for r in _host_memory_records(work).values() if set(r) == {0}]
    assert len(resumed) == 1
    phases = [p['phase'] for p in resumed[0][0]]
    assert phases == ['start', 'setup', 'load', 'train', 'save'], phases
    before = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    after = torch.load(work / 'iter_6.pth', map_location='cpu', weights_only=True)
    assert after['meta']['iter'] == 6 and after['meta']['sharded']['world_size'] == 1
    # the optimizer state was resumed: AdamW's step count went on from 4 (not restarted)
    assert {int(s['step']) for s in after['optimizer']['state'].values()} == {6}
    cores = [k for k in after['state_dict'] if k.endswith('flora_core')]
    assert any(not torch.equal(after['state_dict'][k], before['state_dict'][k]) for k in cores)
    # tools/test.py (one process, unsharded) on the sharded run's checkpoint
    log = _run([sys.executable, osp.join(ROOT, 'tools/test.py'), str(config),
                str(work / 'iter_6.pth'), '--work-dir', str(tmp / 'test_work')], tmp)
    assert 'mIoU' in log
    # tools/merge_adapters.py on the sharded run's adapter file (base from the pretrained file,
    # fingerprint checked against it) and on its full checkpoint
    for source, out in (('iter_4_adapter.safetensors', 'merged_adapter.pth'),
                        ('iter_6.pth', 'merged_full.pth')):
        _run([sys.executable, osp.join(ROOT, 'tools/merge_adapters.py'), str(config),
              str(work / source), str(tmp / out)], tmp)
        merged = torch.load(tmp / out, map_location='cpu', weights_only=True)
        assert not any('flora' in k for k in merged['state_dict'])
