"""UpdateNormHook: how far each stage's weights moved, logged without building the updates."""
from __future__ import annotations

from mmengine.hooks import Hook

from ...peft import DEFAULT_GROUP, update_norms
from ...registry import HOOKS
from ._runner import unwrap


@HOOKS.register_module()
class UpdateNormHook(Hook):
    """Logs ``update_norm/<group>`` (Frobenius norm of the adapters' update per group of
    layers, ``group_pattern`` on the layer names) every ``interval`` iterations (0: never)."""

    priority = 'NORMAL'

    def __init__(self, interval: int = 50, group_pattern: str = DEFAULT_GROUP) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f'norm_interval must be an integer >= 0 (0 disables), got '
                             f'{interval!r}')
        self.interval = interval
        self.group_pattern = group_pattern

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval and self.every_n_train_iters(runner, self.interval):
            norms = update_norms(unwrap(runner.model), self.group_pattern)
            if norms:
                runner.visualizer.add_scalars(
                    {f'update_norm/{k}': v for k, v in norms.items()}, step=runner.iter + 1)
