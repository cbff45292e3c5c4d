"""AdapterCheckpointHook: a small adapter-only file beside every regular checkpoint."""
from __future__ import annotations

import os
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from torch import nn

from ...checkpoint import CKPT_KEY, AtomicLocalBackend, CheckpointError, add_companions
from ...peft.io import (base_fingerprint, gathered_trainable_state_dict, load_adapter_checkpoint,
                        save_adapter_checkpoint)
from ...registry import HOOKS
from ._runner import (checkpoint_hooks, is_resuming, is_training_run, load_from,
                      regular_checkpoint_path, unwrap)


def adapter_path(checkpoint_path: str) -> str:
    """``epoch_3.pth`` -> ``epoch_3_adapter.safetensors`` (its sidecar: ``..._adapter.json``)."""
    return f'{osp.splitext(checkpoint_path)[0]}_adapter.safetensors'


@HOOKS.register_module()
class AdapterCheckpointHook(Hook):
    """- with ``save=True``, writes ``<checkpoint>_adapter.safetensors`` + ``.json``
      (``peft.io``) with every regular checkpoint, from the state that checkpoint holds; with
      the atomic backend both appear together with the checkpoint or not at all, and a resume
      from a checkpoint whose adapter file is missing writes it;
    - records the base weights' fingerprint in every checkpoint;
    - ``checkpoint``: in test / val runs, loads that adapter file on the pretrained base (its
      fingerprint must match)."""

    priority = 'VERY_HIGH'

    def __init__(self, save: bool = True, checkpoint: str | None = None) -> None:
        self.save = save
        self.checkpoint = checkpoint
        self._fingerprint: str | None = None
        self._resumed: tuple[str, dict] | None = None
        self._warned = False

    def before_run(self, runner) -> None:
        self._resumed = None
        if self.checkpoint is None:
            return
        if is_training_run(runner):
            raise ValueError('FLoRAHook(adapter_checkpoint=...) evaluates an adapter file '
                             '(test/val runs); training starts from load_from / resume')
        model = unwrap(runner.model)
        if hasattr(model, 'init_weights'):
            model.init_weights()  # the base weights: PEFTBackbone loads its pretrained file once
        try:
            load_adapter_checkpoint(model, self.checkpoint, strict=True, check_fingerprint=True)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f'adapter checkpoint {self.checkpoint}: {err}') from None
        runner.logger.info(f'FLoRAHook: loaded adapter checkpoint {self.checkpoint}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        path = load_from(runner)
        if is_resuming(runner) and path and osp.exists(path):  # file or DCP dir
            self._resumed = (path, dict(checkpoint.get('meta', {})))

    def before_train(self, runner) -> None:
        # after init_weights / load_from / resume: the base weights are final now
        model = unwrap(runner.model)
        self._fingerprint = base_fingerprint(model)
        if self.save and self._resumed is not None:
            # killed between the checkpoint and its adapter file (no atomic backend): the model
            # holds exactly the checkpoint's state now, so the missing file is written from it
            # (every rank takes part: the tensors may be FSDP shards)
            path, meta = self._resumed
            if not osp.isfile(adapter_path(path)):
                self._write(runner, model, path, meta, commit_with_checkpoint=False)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Called by Runner.save_checkpoint right before it writes ``checkpoint`` (rank 0)."""
        info = checkpoint.setdefault(CKPT_KEY, {})
        info['base_fingerprint'] = self._fingerprint
        meta = checkpoint.get('meta', {})
        path = regular_checkpoint_path(runner, meta)
        if path is None or not self.save:
            return
        info['adapter'] = osp.basename(adapter_path(path))
        atomic = any(isinstance(getattr(h, 'file_backend', None), AtomicLocalBackend)
                     for h in checkpoint_hooks(runner))
        self._write(runner, unwrap(runner.model), path, meta, commit_with_checkpoint=atomic)

    def _warn_if_whole_model(self, runner, model: nn.Module) -> None:
        """Once per run: under ``save_format='dcp'`` (no rank gathers the checkpoint) the
        adapter file still gathers every trained tensor on rank 0; say so when that is nearly
        the whole model (> 90%: Full fine-tuning)."""
        if self._warned or getattr(runner.model, 'save_format', None) != 'dcp':
            return
        self._warned = True
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if total and trained / total > 0.9:
            runner.logger.warning(
                f'FLoRAHook: the adapter file gathers every trained tensor on rank 0 '
                f'({trained:,} of {total:,} parameters), although save_format=\'dcp\' '
                'writes the checkpoint without gathering; the checkpoint directory holds '
                'them all: FLoRAHook(save_adapter=False) turns the adapter file off')

    def _write(self, runner, model: nn.Module, checkpoint_path: str, meta: dict,
               commit_with_checkpoint: bool) -> None:
        path = adapter_path(checkpoint_path)
        self._warn_if_whole_model(runner, model)
        # every rank takes part in gathering FSDP-sharded tensors (FSDPRunner runs the
        # checkpoint hooks on every rank); rank 0 writes
        tensors = gathered_trainable_state_dict(model, rank0_only=True)
        if not is_main_process():
            return
        info = dict(checkpoint=osp.basename(checkpoint_path), epoch=meta.get('epoch'),
                    iter=meta.get('iter'), experiment=runner.experiment_name)
        if commit_with_checkpoint:
            # written under temporary names now, renamed right after the checkpoint itself
            # (or removed if the checkpoint cannot be written): never one without the other
            json_path = path[:-len('.safetensors')] + '.json'
            staged = save_adapter_checkpoint(model, path, fingerprint=self._fingerprint,
                                             tensors=tensors, meta=info, stage=True)
            add_companions(checkpoint_path, list(zip(staged, (path, json_path))))
            size = os.path.getsize(staged[0])
        else:
            save_adapter_checkpoint(model, path, fingerprint=self._fingerprint, tensors=tensors,
                                    meta=info)
            size = os.path.getsize(path)
        runner.logger.info(f'FLoRAHook: adapter checkpoint {path} ({size / 2 ** 20:.2f} MiB)')
