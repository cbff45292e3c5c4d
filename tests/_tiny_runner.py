"""A tiny, deterministic mmengine run (ConvNeXt-V2-atto + linear head on 32x32 tensors) for the
reliability tests, importable and runnable as a script (the SIGKILL test runs it as a real
process):

    python tests/_tiny_runner.py WORK_DIR PRETRAINED [--resume] [--max-iters N]
        [--kill-at N] [--cfg-options k=v ...]

Random draws on purpose: the dataset augments with python's ``random``, numpy and torch, the
sampler shuffles and the head has dropout, so an inexact resume shows in the weights.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import random
import signal
import uuid
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import flora_mm  # noqa: E402,F401
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

PEFT = dict(type='FLoRA', rank=4, kernel_rank=2, scale=1.0)


@MODELS.register_module(force=True)
class TinyNoisyClassifier(BaseModel):
    def __init__(self, backbone: dict, num_classes: int = 3):
        super().__init__()
        self.backbone = MODELS.build(backbone)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(self.backbone.out_channels[-1], num_classes)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.drop(self.backbone(inputs)[-1].mean((2, 3))))
        if mode == 'loss':
            return dict(loss_cls=F.cross_entropy(logits, labels))
        if mode == 'predict':
            return list(zip(logits.argmax(1), labels))
        return logits


@DATASETS.register_module(force=True)
class TinyAugmentedDataset(torch.utils.data.Dataset):
    """12 seeded 32x32 images, 3 classes; random flip (numpy), brightness (python random) and
    noise (torch) on every read. ``nan_from``: images from this index on are NaN."""

    metainfo = dict(classes=('a', 'b', 'c'))

    def __init__(self, n: int = 12, nan_from: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % 3
        self.images[self.labels == 1] += 1.0
        if nan_from is not None:
            self.images[nan_from:] = float('nan')

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if np.random.rand() < 0.5:
            img = img.flip(-1)
        img = img * (1 + 0.1 * (random.random() - 0.5)) + 0.05 * torch.randn(img.shape)
        return dict(inputs=img, labels=self.labels[i])


@METRICS.register_module(force=True)
class TinyAccuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [int(p == t) for p, t in data_samples]

    def compute_metrics(self, results):
        return dict(accuracy=100.0 * sum(results) / max(len(results), 1))


@HOOKS.register_module(force=True)
class KillAtIterHook(Hook):
    """Sends SIGKILL to its own process after iteration ``at`` (after every other hook of that
    iteration, so its checkpoint is complete), like an OOM kill or a preempted job."""

    priority = 'LOWEST'

    def __init__(self, at: int):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def write_pretrained(path: str, seed: int = 123) -> None:
    """A ConvNeXt-V2-atto checkpoint in timm's layout (random weights, fixed seed)."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model('convnextv2_atto', pretrained=False, num_classes=0)
    torch.save(model.state_dict(), path)


def make_cfg(work_dir: str, pretrained: str, max_iters: int = 6, ckpt_interval: int = 2,
             hook: dict | None = None, peft: dict | None = None, val: bool = True,
             nan_from: int | None = None, lr: float = 5e-3) -> Config:
    backbone = dict(type='PEFTBackbone', peft=peft or PEFT,
                    backbone=dict(type='ConvNeXtV2', arch='atto', out_indices=(3,),
                                  init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
    loader = dict(dataset=dict(type='TinyAugmentedDataset', nan_from=nan_from), batch_size=4,
                  num_workers=0, sampler=dict(type='DefaultSampler', shuffle=True),
                  collate_fn=dict(type='default_collate'))
    eval_loader = dict(loader, sampler=dict(type='DefaultSampler', shuffle=False))
    cfg = dict(
        model=dict(type='TinyNoisyClassifier', backbone=backbone),
        work_dir=work_dir,
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=3 if val else 10 ** 6),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=lr, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0,
                              end=4)],
        custom_hooks=[hook or dict(type='FLoRAHook', norm_interval=0)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=ckpt_interval,
                                           by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        default_scope='mmengine',
        # mmengine names the logger after the timestamp: two runners built in the same second
        # would share the first one's log file
        experiment_name=f'tiny_{uuid.uuid4().hex[:12]}',
        randomness=dict(seed=0),
        log_level='WARNING',
    )
    if val:
        cfg.update(val_dataloader=eval_loader, val_cfg=dict(),
                   val_evaluator=dict(type='TinyAccuracy'))
    cfg.update(test_dataloader=eval_loader, test_cfg=dict(),
               test_evaluator=dict(type='TinyAccuracy'))
    return Config(cfg)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('work_dir')
    parser.add_argument('pretrained')
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--max-iters', type=int, default=6)
    parser.add_argument('--kill-at', type=int)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    cfg = make_cfg(args.work_dir, args.pretrained, max_iters=args.max_iters)
    if args.kill_at:
        cfg.custom_hooks.append(dict(type='KillAtIterHook', at=args.kill_at))
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.resume = args.resume
    Runner.from_cfg(cfg).train()


if __name__ == '__main__':
    main()
