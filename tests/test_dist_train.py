"""tools/dist_train.sh with 2 CPU processes: gloo instead of nccl, DDP keeps the ranks equal.

The tiny COCO config is trained for 3 iterations per rank (12 images, batch 2 per rank).
A test-only FLoRAHook subclass (tests/_dist_dump_hook.py) dumps every rank's trainable tensors
before and after training (it comes in through a two-line config on top of the tiny one:
``--cfg-options custom_imports=...`` would not import anything, mmengine's Config.fromfile
imports custom modules only while parsing the file); both ranks must end with identical tensors (DDP averaged their
different batches' gradients), the adapters must have moved from their init, and rank 0's
checkpoint must hold the same values.
"""
from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys

import torch

from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate
from flora_mm.harness.launch import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_COCO = osp.join(ROOT, 'configs/coco/tiny/convnextv2_flora_r16.py')


def test_dist_train_two_cpu_processes(tmp_path):
    generate(str(tmp_path / 'data/tiny'), tasks=['coco'], num_train=12, num_val=2)
    generate_checkpoints(str(tmp_path / 'data/tiny'))
    work = tmp_path / 'work'
    config = tmp_path / 'tiny_coco_dump.py'
    config.write_text(f'_base_ = {TINY_COCO!r}\n'
                      "custom_imports = dict(imports=['flora_mm', '_dist_dump_hook'], "
                      'allow_failed_imports=False)\n'
                      "custom_hooks = [dict(type='RankDumpFLoRAHook', norm_interval=0)]\n")
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([osp.join(ROOT, 'tests'),
                                           os.environ.get('PYTHONPATH', '')]))
    cmd = ['bash', osp.join(ROOT, 'tools/dist_train.sh'), str(config), '2',
           '--work-dir', str(work), '--cfg-options', 'train_dataloader.batch_size=2', 'train_cfg.max_epochs=1',
           'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1',
           'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=240)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert 'nccl -> gloo' in proc.stdout + proc.stderr, log

    dumps = {(tag, r): torch.load(work / f'trainable_{tag}_rank{r}.pt', weights_only=True)
             for tag in ('init', 'final') for r in (0, 1)}
    for d in dumps.values():
        assert d['world_size'] == 2 and d['wrapper'] == 'MMDistributedDataParallel'
    assert dumps['final', 0]['iter'] == dumps['final', 1]['iter'] == 3
    seen0, seen1 = set(dumps['final', 0]['seen']), set(dumps['final', 1]['seen'])
    assert len(seen0) == len(seen1) == 6 and not seen0 & seen1  # each rank its own half
    final0, final1 = dumps['final', 0]['trainable'], dumps['final', 1]['trainable']
    init0, init1 = dumps['init', 0]['trainable'], dumps['init', 1]['trainable']
    assert final0.keys() == final1.keys() == init0.keys()
    adapters = dumps['final', 0]['adapters']
    assert any('flora_core' in k for k in adapters) and set(adapters) <= set(final0)
    for k in final0:
        assert torch.equal(init0[k], init1[k]), f'ranks started apart: {k}'
        assert torch.equal(final0[k], final1[k]), f'ranks ended apart: {k}'
    # FLoRA starts with a zero core: every core must have moved, and so must the factors
    cores = [k for k in adapters if k.endswith('flora_core')]
    assert all(init0[k].abs().max() == 0 and final0[k].abs().max() > 0 for k in cores)
    moved = [k for k in adapters if not torch.equal(init0[k], final0[k])]
    assert len(moved) == len(adapters), set(adapters) - set(moved)

    ckpt = torch.load(work / 'epoch_1.pth', map_location='cpu', weights_only=True)
    for k in final0:
        assert torch.equal(ckpt['state_dict'][k], final0[k]), k
    assert (work / 'epoch_1_adapter.safetensors').is_file()  # FLoRAHook, rank 0 only
