"""What the hooks ask a Runner, in one place.

mmengine offers public ways for most of it (``runner.cfg``, ``runner.hooks``,
``runner.message_hub``); where it offers none (whether ``Runner.train()`` is running, before
``before_train``; which file ``load_checkpoint`` is reading), the private attribute is read here
and nowhere else, and never written.
"""
from __future__ import annotations

import os.path as osp

from mmengine.hooks import CheckpointHook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner import BaseLoop, find_latest_checkpoint
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / TTA wrappers."""
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def is_training_run(runner) -> bool:
    """Inside ``Runner.train()`` (which builds its loop before ``before_run``), not test/val.
    mmengine's public ``train_loop`` would build the loop of a test run: read the field."""
    return isinstance(getattr(runner, '_train_loop', None), BaseLoop)


def setting(runner, key: str):
    """A Runner argument as configured (``resume``, ``load_from``, ``randomness``)."""
    cfg = getattr(runner, 'cfg', None)
    if cfg is not None and key in cfg:
        return cfg.get(key)
    return getattr(runner, f'_{key}', None)  # a Runner built without a config


def is_resuming(runner) -> bool:
    """``resume=True`` in a training run."""
    return is_training_run(runner) and bool(setting(runner, 'resume'))


def load_from(runner) -> str | None:
    """The checkpoint the Runner loads or resumes from: ``load_from``, or for an auto resume
    what ``last_checkpoint`` names (mmengine's ``find_latest_checkpoint``, as the Runner)."""
    path = setting(runner, 'load_from')
    if not path and is_resuming(runner):
        path = find_latest_checkpoint(runner.work_dir)
    return path or None


def checkpoint_hooks(runner) -> list[CheckpointHook]:
    return [h for h in runner.hooks if isinstance(h, CheckpointHook)]


def checkpoint_dir(runner) -> str:
    """Where CheckpointHook writes (its ``out_dir`` once ``before_train`` set it up)."""
    for hook in checkpoint_hooks(runner):
        if hook.out_dir is not None:
            return str(hook.out_dir)
    return runner.work_dir


def regular_checkpoint_path(runner, meta: dict) -> str | None:
    """The path CheckpointHook is saving to (it publishes it as ``last_ckpt`` just before),
    if this save is one of its regular ones (not a ``best_*`` copy)."""
    last = runner.message_hub.get_info('last_ckpt')
    for hook in checkpoint_hooks(runner):
        if last and hook.out_dir is not None:
            step = meta.get('epoch' if hook.by_epoch else 'iter')
            expected = osp.join(str(hook.out_dir), hook.filename_tmpl.format(step))
            if osp.normpath(str(last)) == osp.normpath(expected):
                return str(last)
    return None
