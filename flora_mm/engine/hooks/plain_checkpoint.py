"""PlainCheckpointHook: checkpoints that load with ``weights_only=True``, written atomically,
checked against the model when read."""
from __future__ import annotations

import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ...checkpoint import (ATOMIC_BACKEND, CKPT_KEY, CheckpointError, find_resumable_checkpoint,
                           plain_checkpoint, point_last_checkpoint, remove_stale_temporaries,
                           restore_message_hub)
from ...peft import injected_methods
from ...peft.io import check_checkpoint_fits
from ...registry import HOOKS
from ._runner import (checkpoint_hooks, is_resuming, is_training_run, load_from, setting,
                      unwrap)


@HOOKS.register_module()
class PlainCheckpointHook(Hook):
    """- keeps every checkpoint plain (no numpy / HistoryBuffer objects) and records the PEFT
      methods in it;
    - lets CheckpointHook write through the atomic backend (``atomic=True``) unless it was
      given its own storage, and clears the temporary files a killed save left;
    - on load (``load_from``, ``--resume``, the checkpoint of tools/test.py) refuses files that
      do not fit the model (``peft.io.check_checkpoint_fits``) and a resume with other PEFT
      settings;
    - an auto ``--resume`` whose ``last_checkpoint`` names a missing or truncated file goes on
      from the newest complete checkpoint (``last_checkpoint`` is pointed at it)."""

    priority = 'VERY_HIGH'

    def __init__(self, atomic: bool = True) -> None:
        self.atomic = atomic

    def before_run(self, runner) -> None:
        if not is_training_run(runner):
            return
        if is_resuming(runner) and not setting(runner, 'load_from'):  # auto resume
            self._resolve_auto_resume(runner)
        if self.atomic:
            for hook in checkpoint_hooks(runner):
                # CheckpointHook's before_train (priority VERY_LOW) builds its backend from this
                if (hook.backend_args is None and hook.file_client_args is None
                        and '://' not in str(hook.out_dir or runner.work_dir)):
                    hook.backend_args = dict(backend=ATOMIC_BACKEND)

    @staticmethod
    def _resolve_auto_resume(runner) -> None:
        """mmengine takes ``last_checkpoint`` as it is; make it name the newest checkpoint that
        is complete instead (and say so if that differs)."""
        path = find_resumable_checkpoint(
            runner.work_dir, log=lambda message, level: runner.logger.log(level, message))
        pointer = osp.join(runner.work_dir, 'last_checkpoint')
        if path is not None:
            with open(pointer) if osp.isfile(pointer) else open(osp.devnull) as f:
                named = f.read().strip()
            if named != path:
                point_last_checkpoint(runner.work_dir, path)
        elif osp.isfile(pointer):
            # mmengine would go on with what last_checkpoint names (or an empty path)
            raise CheckpointError(f'--resume: no complete checkpoint in {runner.work_dir}, '
                                  'although last_checkpoint says there was one (see above)')

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        dropped = plain_checkpoint(checkpoint)
        if dropped:
            runner.logger.warning(f'FLoRAHook: left out of the checkpoint (no plain form): '
                                  f'{dropped[:10]}')
        checkpoint.setdefault(CKPT_KEY, {})['methods'] = injected_methods(unwrap(runner.model))
        last = runner.message_hub.get_info('last_ckpt')
        if last and is_main_process():  # no save of this run is under way yet
            stale = remove_stale_temporaries(osp.dirname(str(last)))
            if stale:
                runner.logger.warning(f'FLoRAHook: removed {len(stale)} temporary files an '
                                      f'interrupted save left: {stale[:3]}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Runs before the weights are copied into the model."""
        restore_message_hub(checkpoint)
        path = str(load_from(runner) or 'the checkpoint')
        training, resuming = is_training_run(runner), is_resuming(runner)
        try:
            check_checkpoint_fits(unwrap(runner.model), checkpoint, path,
                                  complete=resuming or not training)
        except CheckpointError as err:
            if resuming:
                raise CheckpointError(f'--resume: {err}') from None
            raise
