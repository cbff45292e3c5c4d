"""ExactResumeHook: a resumed run draws the same random numbers as the run it continues."""
from __future__ import annotations

from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop

from ...checkpoint import CKPT_KEY, rng_state, set_rng_state
from ...registry import HOOKS
from ._runner import is_resuming, is_training_run, load_from, setting


class _RestoreAfterSkip:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` while the loop skips the
    batches a resumed run already trained (loading them draws random numbers: augmentations);
    after the last one it restores the random state and puts the real iterator back."""

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


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Stores the random state (python, numpy, torch, CUDA) in every checkpoint and restores it
    on resume; validation inside training does not draw from training's stream (a resumed run
    does not repeat the validation that followed its checkpoint).

    The data order depends on the seed the dataloader was built with, before any checkpoint
    is read: ``flora_mm.apis.train`` takes it from the checkpoint when the config sets none
    (``restore_run_seed``); a Runner built otherwise gets a warning when the seeds differ.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._training = False
        self._val_rng: dict | None = None
        self._resumed_rng: dict | None = None

    def before_run(self, runner) -> None:
        self._training = is_training_run(runner)
        self._resumed_rng = None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not is_resuming(runner):
            return
        path = load_from(runner) or 'the checkpoint'
        info = checkpoint.get(CKPT_KEY) or {}
        self._resumed_rng = info.get('rng')
        if self._resumed_rng is None:
            runner.logger.warning(f'FLoRAHook: {path} holds no random state (not written by '
                                  'FLoRAHook): the resumed run will not repeat the '
                                  'original one exactly')
        seed = (checkpoint.get('meta') or {}).get('seed')
        if seed is not None and seed != runner.seed:
            runner.logger.warning(
                f'FLoRAHook: {path} was written by a run with seed {seed}, but this run\'s '
                f'dataloaders were built with seed {runner.seed}: the data order will differ. '
                f'Resume through tools/train.py, or set randomness=dict(seed={seed}).')

    def before_train(self, runner) -> None:
        state = self._resumed_rng
        if state is None:
            return
        if get_world_size() > 1 and (setting(runner, 'randomness') or {}).get('diff_rank_seed'):
            # only rank 0's state is in the checkpoint; ranks seeded apart keep their seeds
            runner.logger.warning('FLoRAHook: diff_rank_seed: random state not restored')
            return
        set_rng_state(state)
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and loop.iter > 0:
            loop.dataloader_iterator = _RestoreAfterSkip(loop, loop.iter, state)
        runner.logger.info('FLoRAHook: random state restored from the checkpoint')

    def before_val(self, runner) -> None:
        if self._training:
            self._val_rng = rng_state()

    def after_val(self, runner) -> None:
        if self._val_rng is not None:
            set_rng_state(self._val_rng)
            self._val_rng = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # a save inside validation (best checkpoint) stores training's state
        checkpoint.setdefault(CKPT_KEY, {})['rng'] = (
            self._val_rng if self._val_rng is not None else rng_state())
