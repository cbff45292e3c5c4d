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
- with each regular checkpoint, at the same event (mmengine's ``before_save_checkpoint``) and
  from the same state: writes ``<checkpoint>_adapter.safetensors`` + ``.json``, stores the random
  state (python, numpy, torch, CUDA) and the PEFT methods in the checkpoint, and keeps the
  checkpoint plain (no numpy / HistoryBuffer objects: it loads with ``weights_only=True``);
  CheckpointHook writes through an atomic backend (temporary file + rename);
- stops the run at the first non-finite loss (before CheckpointHook can save that state), and
  refuses to save non-finite trainable tensors;
- on load (``load_from``, ``--resume``, the checkpoint of tools/test.py) checks that the file
  fits the model (see ``flora_mm.engine.checkpoint.check_checkpoint_fits``) and that a resume
  uses the PEFT settings the checkpoint was written with; an auto ``--resume`` falls back to the
  newest complete checkpoint; a resume restores the random state, so it continues exactly;
- logs the Frobenius norm of the update per stage every ``norm_interval`` iterations;
- at the end of training, checks that the frozen weights did not change.
"""
from __future__ import annotations

import os
import os.path as osp

import torch
from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.runner import BaseLoop, IterBasedTrainLoop
from torch import nn

from ..peft import (DEFAULT_GROUP, build_peft_method, count_parameters, format_table,
                    inject_into_parts, injected_roots, normalize_parts, parameter_table,
                    unexpected_trainable, update_norms)
from ..peft.io import (base_digests, base_fingerprint, gathered_trainable_state_dict,
                       load_adapter_checkpoint,
                       save_adapter_checkpoint, trainable_state_dict)
from ..registry import HOOKS
from .checkpoint import (ATOMIC_BACKEND, CKPT_KEY, CheckpointError, check_checkpoint_fits,
                         find_resumable_checkpoint, non_finite_tensors, peft_methods,
                         plain_checkpoint, restore_message_hub, rng_state, set_rng_state)

# the inspection helpers live in flora_mm.peft; importable from here as before
__all__ = ['FLoRAHook', 'parameter_table', 'format_table', 'unexpected_trainable',
           'update_norms', 'DEFAULT_GROUP']


def _unwrap(model: nn.Module) -> nn.Module:
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


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
                 check_frozen: bool = True, check_finite: bool = True,
                 atomic_checkpoints: bool = True, exact_resume: bool = True,
                 adapter_checkpoint: str | None = None) -> None:
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
        self.check_finite = check_finite
        self.atomic_checkpoints = atomic_checkpoints
        self.exact_resume = exact_resume
        self.adapter_checkpoint = adapter_checkpoint
        self._frozen_digest: dict[str, str] | None = None
        self._fingerprint: str | None = None
        self._training = False  # inside Runner.train() (not test/val)
        self._val_rng: dict | None = None  # training's random state while validation runs
        self._resumed: dict | None = None  # path, meta and random state of a resumed checkpoint

    # -- injection ------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        # Runner.train() builds its loop before before_run; test() and val() do not
        self._training = isinstance(getattr(runner, '_train_loop', None), BaseLoop)
        self._resumed = None
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
        if self._training:
            if self.adapter_checkpoint is not None:
                raise ValueError('FLoRAHook(adapter_checkpoint=...) evaluates an adapter file '
                                 '(test/val runs); training starts from load_from / resume')
            self._resolve_auto_resume(runner)
            if self.atomic_checkpoints:
                self._use_atomic_backend(runner)
        elif self.adapter_checkpoint is not None:
            self._load_adapter_checkpoint(runner, model)

    def _load_adapter_checkpoint(self, runner, model: nn.Module) -> None:
        """Test/val with an adapter file: the base weights come from the pretrained file
        (``init_weights``; Runner.test does not call it), the rest from the adapter file,
        whose base fingerprint must match."""
        path = self.adapter_checkpoint
        if hasattr(model, 'init_weights'):
            model.init_weights()  # PEFTBackbone loads its pretrained file once only
        try:
            load_adapter_checkpoint(model, path, strict=True, check_fingerprint=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f'adapter checkpoint {path}: {err}') from None
        runner.logger.info(f'FLoRAHook: loaded adapter checkpoint {path}')

    def _resolve_auto_resume(self, runner) -> None:
        """Auto ``--resume`` (resume=True, no load_from): mmengine takes ``last_checkpoint`` as
        it is; pick the newest checkpoint that is complete instead (and say so if that differs).
        Runner.load_or_resume runs after before_run and reads ``_load_from``."""
        if not getattr(runner, '_resume', False) or getattr(runner, '_load_from', None):
            return
        path = find_resumable_checkpoint(
            runner.work_dir, log=lambda message, level: runner.logger.log(level, message))
        if path is not None:
            runner._load_from = path
        elif osp.isfile(osp.join(runner.work_dir, 'last_checkpoint')):
            # mmengine would go on with what last_checkpoint names (or an empty path)
            raise CheckpointError(f'--resume: no complete checkpoint in {runner.work_dir}, '
                                  'although last_checkpoint says there was one (see above)')

    @staticmethod
    def _use_atomic_backend(runner) -> None:
        """Let CheckpointHook write through the atomic backend unless it was given its own
        storage; its ``before_train`` (priority VERY_LOW) builds the backend from this."""
        for hook in runner.hooks:
            if (isinstance(hook, CheckpointHook) and hook.backend_args is None
                    and hook.file_client_args is None
                    and '://' not in str(hook.out_dir or runner.work_dir)):
                hook.backend_args = dict(backend=ATOMIC_BACKEND)

    def _inject(self, runner, model: nn.Module) -> None:
        from .fsdp import is_fully_sharded
        if is_fully_sharded(runner.model):
            raise RuntimeError('FLoRAHook(peft=...) injects after the Runner has sharded the '
                               'model (FSDP); build the backbone with type=\'PEFTBackbone\' so '
                               'the adapters exist before sharding')
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
        counts = count_parameters(model)
        runner.message_hub.update_info('flora_mm_trainable', counts['trainable'])
        if self._resumed is not None:
            self._after_resume(runner, model)

    def _after_resume(self, runner, model: nn.Module) -> None:
        resumed = self._resumed
        if self.save_adapter and resumed['path']:
            # killed between the checkpoint and its adapter file: the model holds exactly the
            # checkpoint's state now, so the missing file is written from it (every rank takes
            # part: the tensors may be FSDP shards)
            adapter = self._adapter_path(resumed['path'])
            if not osp.isfile(adapter):
                self._write_adapter(runner, model, resumed['path'], resumed['meta'])
        state = resumed['rng']
        if not self.exact_resume or state is None:
            return
        if get_world_size() > 1 and getattr(runner, '_randomness_cfg', {}).get('diff_rank_seed'):
            # only rank 0's state is in the checkpoint; ranks seeded apart keep their seeds
            runner.logger.warning('FLoRAHook: diff_rank_seed: random state not restored')
            return
        set_rng_state(state)
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and loop.iter > 0:
            # IterBasedTrainLoop.run skips the batches already trained by loading them, which
            # draws random numbers (augmentations): restore the state again after the skip
            loop.dataloader_iterator = _RestoreAfterSkip(loop, loop.iter, state)
        runner.logger.info('FLoRAHook: random state restored from the checkpoint')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        # priority VERY_HIGH: runs before CheckpointHook (VERY_LOW) could save this state
        if self.check_finite and isinstance(outputs, dict):
            self._check_loss(runner, outputs)
        if self.norm_interval and self.every_n_train_iters(runner, self.norm_interval):
            norms = update_norms(_unwrap(runner.model), self.group_pattern)
            if norms:
                runner.visualizer.add_scalars(
                    {f'update_norm/{k}': v for k, v in norms.items()}, step=runner.iter + 1)

    @staticmethod
    def _check_loss(runner, outputs: dict) -> None:
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

    def before_val(self, runner) -> None:
        # validation must not draw from training's random stream: a resumed run does not
        # repeat the validation that followed its checkpoint
        if self._training and self.exact_resume:
            self._val_rng = rng_state()

    def after_val(self, runner) -> None:
        if self._val_rng is not None:
            set_rng_state(self._val_rng)
            self._val_rng = None

    def after_train(self, runner) -> None:
        if self.check_frozen and self._frozen_digest is not None:
            now = base_digests(_unwrap(runner.model))
            changed = [k for k, v in self._frozen_digest.items() if now.get(k) != v]
            if changed:
                raise RuntimeError(f'FLoRAHook: {len(changed)} frozen base tensors changed '
                                   f'during training, e.g. {changed[:5]}')
            runner.logger.info(f'FLoRAHook: {len(now)} frozen base tensors unchanged')

    # -- checkpoints ----------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Called by Runner.save_checkpoint right before it writes ``checkpoint`` (rank 0)."""
        model = _unwrap(runner.model)
        meta = checkpoint.get('meta', {})
        if self.check_finite:
            state = checkpoint['state_dict']
            bad = non_finite_tensors({k: state[k] for k in trainable_state_dict(model)
                                      if k in state})
            if bad:
                raise RuntimeError(
                    f'FLoRAHook: refusing to save a checkpoint at epoch {meta.get("epoch")}, '
                    f'iteration {meta.get("iter")}: {len(bad)} trained tensors hold NaN/Inf '
                    f'(e.g. {bad[:5]}); the last good checkpoint is kept')
        dropped = plain_checkpoint(checkpoint)
        if dropped:
            runner.logger.warning(f'FLoRAHook: left out of the checkpoint (no plain form): '
                                  f'{dropped[:10]}')
        checkpoint[CKPT_KEY] = dict(
            methods=peft_methods(model), base_fingerprint=self._fingerprint,
            rng=self._val_rng if self._val_rng is not None else rng_state())
        path = self._regular_checkpoint_path(runner, meta)
        if path is not None and self.save_adapter:
            checkpoint[CKPT_KEY]['adapter'] = osp.basename(self._adapter_path(path))
            # written before the checkpoint itself: the checkpoint's rename is the commit point
            self._write_adapter(runner, model, path, meta)

    @staticmethod
    def _regular_checkpoint_path(runner, meta: dict) -> str | None:
        """The path CheckpointHook is saving to (it publishes it as ``last_ckpt`` just before),
        if this save is one of its regular ones (not a ``best_*`` copy)."""
        last = runner.message_hub.get_info('last_ckpt')
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook) and last and hook.out_dir is not None:
                step = meta.get('epoch' if hook.by_epoch else 'iter')
                expected = osp.join(str(hook.out_dir), hook.filename_tmpl.format(step))
                if osp.normpath(str(last)) == osp.normpath(expected):
                    return str(last)
        return None

    @staticmethod
    def _adapter_path(checkpoint_path: str) -> str:
        return f'{osp.splitext(checkpoint_path)[0]}_adapter.safetensors'

    def _write_adapter(self, runner, model: nn.Module, checkpoint_path: str, meta: dict) -> None:
        path = self._adapter_path(checkpoint_path)
        # every rank takes part in gathering FSDP-sharded tensors (FSDPRunner runs the
        # checkpoint hooks on every rank); rank 0 writes
        tensors = gathered_trainable_state_dict(model, rank0_only=True)
        if not is_main_process():
            return
        save_adapter_checkpoint(
            model, path, fingerprint=self._fingerprint, tensors=tensors,
            meta=dict(checkpoint=osp.basename(checkpoint_path), epoch=meta.get('epoch'),
                      iter=meta.get('iter'), experiment=runner.experiment_name))
        runner.logger.info(f'FLoRAHook: adapter checkpoint {path} '
                           f'({os.path.getsize(path) / 2 ** 20:.2f} MiB)')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Called by Runner.load_checkpoint (load_from, resume, test) before the weights are
        copied into the model: refuse files that do not fit, restore mmengine objects."""
        restore_message_hub(checkpoint)
        path = str(getattr(runner, '_load_from', None) or 'the checkpoint')
        resuming = self._training and bool(getattr(runner, '_resume', False))
        model = _unwrap(runner.model)
        try:
            check_checkpoint_fits(model, checkpoint, path,
                                  complete=resuming or not self._training)
        except CheckpointError as err:
            if resuming:
                raise CheckpointError(f'--resume: {err}') from None
            raise
        if resuming:
            info = checkpoint.get(CKPT_KEY) or {}
            self._resumed = dict(path=path if osp.isfile(path) else None,
                                 meta=dict(checkpoint.get('meta', {})), rng=info.get('rng'))
            if info.get('rng') is None and self.exact_resume:
                runner.logger.warning(f'FLoRAHook: {path} holds no random state (not written by '
                                      'FLoRAHook): the resumed run will not repeat the '
                                      'original one exactly')


class _RestoreAfterSkip:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` while the loop skips the
    batches a resumed run already trained; after the last one it restores the random state
    and puts the real iterator back."""

    def __init__(self, loop, count: int, state: dict) -> None:
        self.loop, self.inner = loop, loop.dataloader_iterator
        self.count, self.state = count, state

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.count -= 1
        if self.count <= 0:
            set_rng_state(self.state)
            self.loop.dataloader_iterator = self.inner
        return batch
