"""Exact resume with the shipped tiny configs as they are: no ``randomness.seed`` in them.

mmengine draws a seed when the config sets none and records it in every checkpoint, but a
resumed run builds its dataloaders (sampler order, worker seeds) with a new one before it reads
the checkpoint; ``flora_mm.apis.train`` takes the seed from the checkpoint first. For COCO
(epoch-based Mask R-CNN) and ADE20K (iteration-based UperNet), with ``tools/train.py``:
- an uninterrupted run U (3 checkpoints);
- a resume from U's first checkpoint, in a folder of its own;
- a second resume from the same checkpoint, killed from outside (SIGKILL) as soon as it has
  written its next checkpoint, then resumed again.
Both end with U's weights, bit for bit. Before the fix the weights differed (the issue's probe:
250 of 386 tensors on COCO tiny).
"""
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config

from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = {
    'coco': dict(config='configs/coco/tiny/convnextv2_flora_r16.py', steps=('epoch', 1),
                 options=['train_cfg.max_epochs=3', 'train_cfg.val_interval=100',
                          'default_hooks.checkpoint.interval=1']),
    'ade20k': dict(config='configs/ade20k/tiny/convnextv2_flora_r16.py', steps=('iter', 2),
                   options=['train_cfg.max_iters=6', 'train_cfg.val_interval=100',
                            'default_hooks.checkpoint.interval=2']),
}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """4 training images per task: 1 iteration per COCO epoch at batch size 4."""
    root = tmp_path_factory.mktemp('resume')
    generate(str(root / 'data/tiny'), tasks=['coco', 'ade20k'], num_train=4, num_val=2)
    generate_checkpoints(str(root / 'data/tiny'))
    return root


def _train(root, task: str, work, *extra: str) -> subprocess.Popen:
    spec = TASKS[task]
    cmd = [sys.executable, osp.join(ROOT, 'tools/train.py'), osp.join(ROOT, spec['config']),
           '--work-dir', str(work), *extra, '--cfg-options', *spec['options']]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    return subprocess.Popen(cmd, cwd=str(root), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _checkpoint(work, task: str, n: int) -> str:
    kind, step = TASKS[task]['steps']
    return osp.join(str(work), f'{kind}_{n * step}.pth')


def _state(path: str) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.mark.parametrize('task', list(TASKS))
def test_resumes_without_a_seed_end_bit_identical(data_root, tmp_path, task):
    config = Config.fromfile(osp.join(ROOT, TASKS[task]['config']))
    assert (config.get('randomness') or {}).get('seed') is None  # the config as shipped
    full = tmp_path / 'uninterrupted'
    _finish(_train(data_root, task, full))
    first, last = _checkpoint(full, task, 1), _checkpoint(full, task, 3)
    seed = torch.load(first, weights_only=True)['meta']['seed']
    assert isinstance(seed, int)

    def start_from_first(name: str):
        work = tmp_path / name
        work.mkdir()
        for path in (first, first[:-4] + '_adapter.safetensors', first[:-4] + '_adapter.json'):
            shutil.copy(path, work)
        return work

    resumed = start_from_first('resumed')
    log = _finish(_train(data_root, task, resumed, '--resume'))
    assert f'resuming with the seed of {resumed}' in log and str(seed) in log

    killed = start_from_first('killed')
    proc = _train(data_root, task, killed, '--resume')
    deadline = time.time() + 600
    while not osp.exists(_checkpoint(killed, task, 2)) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not osp.exists(_checkpoint(killed, task, 3))
    _finish(_train(data_root, task, killed, '--resume'))

    expected = _state(last)
    moved = _state(first)
    assert any(not torch.equal(moved[k], v) for k, v in expected.items() if 'flora_core' in k)
    for work in (resumed, killed):
        got = _state(_checkpoint(work, task, 3))
        assert got.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not differ, f'{work.name}: {len(differ)} tensors differ, e.g. {differ[:3]}'
