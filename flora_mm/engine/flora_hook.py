"""FLoRAHook: checks, logs and saves what a PEFT run trains.

``custom_hooks=[dict(type='FLoRAHook', ...)]``:
- ``peft`` + ``parts``: inject adapters into the named model parts itself (for models built
  without ``PEFTBackbone``). mmengine builds and DDP-wraps the model in ``Runner.__init__`` and
  builds the optimizer and schedulers in ``Runner.train()`` before ``before_run``; so the hook
  injects in ``before_run`` (priority VERY_HIGH: before other hooks cache the model) and then
  rebuilds exactly those with the Runner's own builders (``wrap_model``, ``build_optim_wrapper``,
  ``scale_lr``, ``build_param_scheduler``). Pretrained loading (``init_weights``) and
  ``load_from``/resume come after ``before_run`` and so fill the base weights of the adapted model.
- logs a table of total/trainable parameters per part and fails if anything outside the intended
  set trains (inside adapted parts: exactly the method's tensors); frozen tensors are taken
  out of the optimizer;
- writes ``<checkpoint>_adapter.safetensors`` + ``.json`` next to each regular checkpoint;
- logs the Frobenius norm of the update per stage every ``norm_interval`` iterations;
- at the end of training, checks that the frozen weights did not change.
"""
from __future__ import annotations

import os

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from torch import nn

from ..peft import (DEFAULT_GROUP, build_peft_method, count_parameters, format_table,
                    inject_into_parts, injected_roots, normalize_parts, parameter_table,
                    unexpected_trainable, update_norms)
from ..peft.io import base_digests, base_fingerprint, save_adapter_checkpoint
from ..registry import HOOKS

# the inspection helpers live in flora_mm.peft; importable from here as before
__all__ = ['FLoRAHook', 'parameter_table', 'format_table', 'unexpected_trainable',
           'update_norms', 'DEFAULT_GROUP']


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _drop_frozen_from_optimizer(runner) -> None:
    """mmengine's optimizer constructors hand every parameter to the optimizer, frozen ones
    too (a frozen ConvNeXt-V2-L is 196M of them, walked by every step and gradient clip).
    Keep only trainable ones; this runs before the first step and before resume, so no
    optimizer state exists yet. Empty groups stay, aligned with the schedulers' lists."""
    optim_wrapper = getattr(runner, 'optim_wrapper', None)
    if isinstance(optim_wrapper, OptimWrapperDict):
        wrappers = list(optim_wrapper.values())
    elif isinstance(optim_wrapper, OptimWrapper):
        wrappers = [optim_wrapper]
    else:  # not built (test / val runs)
        return
    for wrapper in wrappers:
        for group in wrapper.optimizer.param_groups:
            group['params'] = [p for p in group['params'] if p.requires_grad]


@HOOKS.register_module()
class FLoRAHook(Hook):
    """See the module docstring. ``parts`` are attribute paths of the model (e.g. 'backbone')."""

    priority = 'VERY_HIGH'

    def __init__(self, peft: dict | None = None, parts: list[str] | tuple[str, ...] = ('backbone',),
                 norm_interval: int = 50, group_pattern: str = DEFAULT_GROUP,
                 save_adapter: bool = True, check_trainable: bool = True,
                 check_frozen: bool = True) -> None:
        if peft is not None:
            build_peft_method(peft)  # validate the config now, not after the Runner is built
        if norm_interval < 0:
            raise ValueError(f'norm_interval must be >= 0 (0 disables), got {norm_interval}')
        self.peft = peft
        self.parts = normalize_parts(parts)
        self.norm_interval = norm_interval
        self.group_pattern = group_pattern
        self.save_adapter = save_adapter
        self.check_trainable = check_trainable
        self.check_frozen = check_frozen
        self._frozen_digest: dict[str, str] | None = None
        self._fingerprint: str | None = None
        self._last_ckpt: str | None = None

    # -- injection ------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        model = _unwrap(runner.model)
        if self.peft is not None:
            self._inject(runner, model)
        if not list(injected_roots(model)):
            raise RuntimeError('FLoRAHook: the model has no PEFT method: build the backbone with '
                               "type='PEFTBackbone' or give the hook peft=dict(...)")
        runner.logger.info('FLoRAHook parameters per part:\n'
                           + format_table(parameter_table(model)))
        if self.check_trainable:
            extra, frozen = unexpected_trainable(model)
            if extra or frozen:
                raise RuntimeError(
                    f'FLoRAHook: trainable set is not the intended one: {len(extra)} tensors '
                    f'train outside the PEFT method (e.g. {extra[:5]}), {len(frozen)} method '
                    f'tensors are frozen (e.g. {frozen[:5]})')
        _drop_frozen_from_optimizer(runner)

    def _inject(self, runner, model: nn.Module) -> None:
        changed = False
        for part, names in inject_into_parts(model, self.peft, self.parts).items():
            if names is None:
                runner.logger.info(f'FLoRAHook: {part} already carries adapters; not injecting')
                continue
            runner.logger.info(f'FLoRAHook: {self.peft["type"]} injected into {len(names)} '
                               f'layers of {part}')
            changed = True
        if not changed:
            return
        # the DDP wrapper and the optimizer hold the old parameter list: rebuild both with the
        # Runner's own builders (and the schedulers bound to the optimizer), from its config
        if 'optim_wrapper' not in runner.cfg:
            raise RuntimeError('FLoRAHook(peft=...) rebuilds the optimizer from the config: '
                               'build the Runner with Runner.from_cfg (as tools/train.py does)')
        runner.model = runner.wrap_model(runner.cfg.get('model_wrapper_cfg'), model)
        runner.optim_wrapper = runner.build_optim_wrapper(runner.cfg.optim_wrapper)
        runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
        if runner.param_schedulers is not None and runner.cfg.get('param_scheduler'):
            runner.param_schedulers = runner.build_param_scheduler(runner.cfg.param_scheduler)

    # -- bookkeeping ----------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        # after init_weights / load_from / resume: the base weights are final now
        model = _unwrap(runner.model)
        self._fingerprint = base_fingerprint(model)
        if self.check_frozen:
            self._frozen_digest = base_digests(model)
        self._last_ckpt = runner.message_hub.get_info('last_ckpt')
        counts = count_parameters(model)
        runner.message_hub.update_info('flora_mm_trainable', counts['trainable'])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.norm_interval and self.every_n_train_iters(runner, self.norm_interval):
            norms = update_norms(_unwrap(runner.model), self.group_pattern)
            if norms:
                runner.visualizer.add_scalars(
                    {f'update_norm/{k}': v for k, v in norms.items()}, step=runner.iter + 1)
        self._maybe_save_adapter(runner)

    def after_train_epoch(self, runner) -> None:
        self._maybe_save_adapter(runner)

    def after_train(self, runner) -> None:
        self._maybe_save_adapter(runner)
        if self.check_frozen and self._frozen_digest is not None:
            now = base_digests(_unwrap(runner.model))
            changed = [k for k, v in self._frozen_digest.items() if now.get(k) != v]
            if changed:
                raise RuntimeError(f'FLoRAHook: {len(changed)} frozen base tensors changed '
                                   f'during training, e.g. {changed[:5]}')
            runner.logger.info(f'FLoRAHook: {len(now)} frozen base tensors unchanged')

    def _maybe_save_adapter(self, runner) -> None:
        """CheckpointHook (priority VERY_LOW, after this hook's work in the same event on the
        next call) publishes the path of each checkpoint as ``last_ckpt``: mirror it."""
        if not self.save_adapter:
            return
        ckpt = runner.message_hub.get_info('last_ckpt')
        if not ckpt or ckpt == self._last_ckpt:
            return
        self._last_ckpt = ckpt
        if not is_main_process():
            return
        stem, _ = os.path.splitext(ckpt)
        path = f'{stem}_adapter.safetensors'
        save_adapter_checkpoint(
            _unwrap(runner.model), path, fingerprint=self._fingerprint,
            meta=dict(checkpoint=os.path.basename(ckpt), epoch=runner.epoch, iter=runner.iter,
                      experiment=runner.experiment_name))
        runner.logger.info(f'FLoRAHook: adapter checkpoint {path} '
                           f'({os.path.getsize(path) / 2 ** 20:.2f} MiB)')
