"""FiniteCheckHook: a diverged run stops at once, and its state is never saved."""
from __future__ import annotations

import torch
from mmengine.hooks import Hook

from ...checkpoint import non_finite_tensors
from ...peft.io import trainable_state_dict
from ...registry import HOOKS
from ._runner import unwrap


@HOOKS.register_module()
class FiniteCheckHook(Hook):
    """What mmdet's ``CheckInvalidLossHook`` does, at every iteration and for every loss term,
    for every task package (mmseg and mmrotate have none), with a message that says what was
    kept; and a checkpoint whose trained tensors hold NaN/Inf is refused
    (``before_save_checkpoint``). Priority VERY_HIGH: the check runs before CheckpointHook
    (VERY_LOW) could save the diverged state."""

    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not isinstance(outputs, dict):
            return
        terms = {}
        for key, value in outputs.items():
            if 'loss' in key and isinstance(value, (torch.Tensor, float, int)):
                terms[key] = float(value.detach().float().mean()) if isinstance(
                    value, torch.Tensor) else float(value)
        bad = [k for k, v in terms.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            last = runner.message_hub.get_info('last_ckpt')
            raise RuntimeError(
                f'FLoRAHook: non-finite loss at iteration {runner.iter + 1} (epoch '
                f'{runner.epoch + 1}): {", ".join(f"{k}={terms[k]}" for k in terms)} '
                f'(non-finite: {", ".join(bad)}). The run stops; no checkpoint of this state is '
                f'written; the last good checkpoint is {last or "none (none was saved)"}. '
                'Lower the learning rate or check the data.')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint['state_dict']
        meta = checkpoint.get('meta', {})
        bad = non_finite_tensors({k: state[k] for k in trainable_state_dict(unwrap(runner.model))
                                  if k in state})
        if bad:
            raise RuntimeError(
                f'FLoRAHook: refusing to save a checkpoint at epoch {meta.get("epoch")}, '
                f'iteration {meta.get("iter")}: {len(bad)} trained tensors hold NaN/Inf '
                f'(e.g. {bad[:5]}); the last good checkpoint is kept')
