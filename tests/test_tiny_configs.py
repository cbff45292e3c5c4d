"""Every tiny config trains in the real Runner and is evaluated with its task's real metric
(CocoMetric bbox+segm, IoUMetric mIoU, DOTAMetric mAP); the trained model must score higher
than the same model before training (pretrained backbone, freshly initialised heads)."""
import copy
import math
import os

import pytest
import torch
from mmengine.runner import Runner

from .conftest import TINY_CONFIGS, register_scope, tiny_config

EXPECTED_METRICS = {
    'coco': ('coco/bbox_mAP', 'coco/segm_mAP'),
    'ade20k': ('mIoU',),
    'ade20k_internvit': ('mIoU',),
    'dota': ('dota/mAP',),
}
# training length per config: as short as still shows learning on the tiny data
EPOCHS = {'coco': 4, 'dota': 4}
ITERS = {'ade20k': 20, 'ade20k_internvit': 20}


def _shorten(cfg, name: str) -> str:
    """Shorten the schedule in place; returns the checkpoint name it ends with."""
    if cfg.train_cfg.get('by_epoch', cfg.train_cfg.get('type') == 'EpochBasedTrainLoop'):
        cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = EPOCHS[name]
        cfg.default_hooks.checkpoint.interval = EPOCHS[name]
        return f'epoch_{EPOCHS[name]}'
    cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = ITERS[name]
    cfg.default_hooks.checkpoint.interval = ITERS[name]
    schedulers = cfg.param_scheduler
    for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
        # PolyLR etc. end with the shortened schedule
        if scheduler.get('end', 0) > ITERS[name]:
            scheduler.end = ITERS[name]
    return f'iter_{ITERS[name]}'


def _untrained_metrics(cfg, work_dir: str) -> dict:
    """The task metric of the model as training starts (init_weights, no step)."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.experiment_name = 'untrained'
    runner = Runner.from_cfg(cfg)
    runner.model.init_weights()
    return runner.test()


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_tiny_config_trains_and_evaluates(name, tiny_root, tmp_path, request):
    if name == 'dota':
        request.getfixturevalue('dota_metric_in_threads')
    cfg = tiny_config(name, tiny_root)
    cfg.work_dir = str(tmp_path)
    # the configs set no seed and mmengine then draws one from numpy's global state, which
    # depends on what ran before in the process (another order under pytest-xdist): seeded,
    # the run is the same wherever the test runs
    cfg.randomness = dict(seed=0)
    ckpt = _shorten(cfg, name)
    if name in ('coco', 'dota'):
        # an untrained or briefly trained detector clears no 0.05 score threshold and the
        # metrics would have nothing to score: keep every detection so the real metric computes
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    register_scope(cfg.default_scope)
    untrained = _untrained_metrics(cfg, str(tmp_path / 'untrained'))
    runner = Runner.from_cfg(cfg)
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()
              if p.requires_grad and 'backbone' in n}
    runner.train()
    changed = [n for n, p in runner.model.named_parameters()
               if n in before and not torch.equal(p, before[n])]
    assert changed, 'no backbone adapter tensor was updated'
    assert os.path.isfile(tmp_path / f'{ckpt}.pth')
    assert os.path.isfile(tmp_path / f'{ckpt}_adapter.safetensors')
    metrics = runner.test()
    for key in EXPECTED_METRICS[name]:
        assert key in metrics, sorted(metrics)
        value = metrics[key]
        assert math.isfinite(value) and 0.0 <= value <= 100.0, (key, value)
        assert value > untrained[key], (key, value, 'untrained', untrained[key])
