"""UpdateNormHook: how far each stage's weights moved, logged without building the updates."""
from __future__ import annotations

from mmengine.hooks import Hook

from torch import nn

from ...models import describe
from ...peft import injected_roots, update_norms
from ...registry import HOOKS
from ._runner import unwrap


def described_stages(model: nn.Module):
    """A layer name's stage, as the description of the backbone holding it names it."""
    roots = [(f'{name}.' if name else '', describe(root)) for name, root, _ in
             injected_roots(model)]

    def stage_of(name: str) -> str:
        for prefix, description in roots:
            if name.startswith(prefix):
                return description.stage_of(name[len(prefix):])
        return 'other'
    return stage_of


@HOOKS.register_module()
class UpdateNormHook(Hook):
    """Logs ``update_norm/<stage>`` (Frobenius norm of the adapters' update per stage of the
    backbone, as its description names the stages, or group 1 of ``group_pattern`` on the
    layer names) every ``interval`` iterations (0: never)."""

    priority = 'NORMAL'

    def __init__(self, interval: int = 50, group_pattern: str | None = None) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f'norm_interval must be an integer >= 0 (0 disables), got '
                             f'{interval!r}')
        self.interval = interval
        self.group_pattern = group_pattern

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval and self.every_n_train_iters(runner, self.interval):
            model = unwrap(runner.model)
            norms = update_norms(model, self.group_pattern or described_stages(model))
            if norms:
                runner.visualizer.add_scalars(
                    {f'update_norm/{k}': v for k, v in norms.items()}, step=runner.iter + 1)
