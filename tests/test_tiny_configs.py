"""Every tiny config trains a few iterations in the real Runner and is evaluated with its task's
real metric (CocoMetric bbox+segm, IoUMetric mIoU, DOTAMetric mAP)."""
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


@pytest.mark.parametrize('name', list(TINY_CONFIGS))
def test_tiny_config_trains_and_evaluates(name, tiny_root, tmp_path):
    cfg = tiny_config(name, tiny_root)
    cfg.work_dir = str(tmp_path)
    if cfg.train_cfg.get('by_epoch', cfg.train_cfg.get('type') == 'EpochBasedTrainLoop'):
        cfg.train_cfg.max_epochs = 1
        cfg.train_cfg.val_interval = 1
        cfg.default_hooks.checkpoint.interval = 1
        ckpt = 'epoch_1'
    else:
        cfg.train_cfg.max_iters = 3
        cfg.train_cfg.val_interval = 3
        cfg.default_hooks.checkpoint.interval = 3
        ckpt = 'iter_3'
    if name in ('coco', 'dota'):
        # after a few iterations no detection clears 0.05 and the metrics would have nothing to
        # score: keep every detection so the real metric computes
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    register_scope(cfg.default_scope)
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
