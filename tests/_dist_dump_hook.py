"""Test helper for tests/test_dist_train.py: a FLoRAHook that also dumps what each rank trains.

Only rank 0 writes checkpoints, so the checkpoint alone cannot show that the ranks agree: every
rank saves its trainable tensors (adapters, output norms, neck and heads) before and after
training to ``<work_dir>/trainable_{init,final}_rank{R}.pt``. The test's config imports it
(``custom_imports``) with tests/ on PYTHONPATH.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.model import is_model_wrapper

from flora_mm.engine import FLoRAHook
from flora_mm.peft import adapter_state_dict
from flora_mm.registry import HOOKS


@HOOKS.register_module()
class RankDumpFLoRAHook(FLoRAHook):

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._seen: list[str] = []
        self._dump(runner, 'init')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        self._seen += [s.img_path for s in data_batch['data_samples']]

    def after_train(self, runner) -> None:
        super().after_train(runner)
        self._dump(runner, 'final')

    def _dump(self, runner, tag: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        trainable = {k: p.detach().cpu().clone() for k, p in model.named_parameters()
                     if p.requires_grad}
        torch.save(dict(trainable=trainable, adapters=sorted(adapter_state_dict(model)),
                        wrapper=type(runner.model).__name__, world_size=get_world_size(),
                        iter=runner.iter, seen=list(self._seen)),
                   osp.join(runner.work_dir, f'trainable_{tag}_rank{get_rank()}.pt'))
