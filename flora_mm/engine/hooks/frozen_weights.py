"""FrozenWeightsHook: the frozen weights are the same at the end of training as at its start."""
from __future__ import annotations

from mmengine.hooks import Hook
from torch import nn

from ...peft import injected_roots
from ...peft.io import base_digests
from ...registry import HOOKS
from ._runner import unwrap


def frozen_norms_in_train_mode(model: nn.Module) -> list[str]:
    """Batch-norm layers inside adapted modules whose affine weights are frozen but which run
    in train mode: their running statistics follow the new data."""
    found = []
    for root_name, root, _ in injected_roots(model):
        for name, module in root.named_modules():
            if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
                    and module.track_running_stats
                    and not any(p.requires_grad for p in module.parameters(recurse=False))):
                found.append('.'.join(n for n in (root_name, name) if n))
    return found


@HOOKS.register_module()
class FrozenWeightsHook(Hook):
    """Digests of the frozen base parameters at ``before_train`` (after loading) and again at
    ``after_train``; any change is an error naming the tensors. Parameters only: the running
    statistics of batch norms in train mode are buffers that move by design, which the first
    iteration reports once (mmdet's ``norm_eval=True`` keeps them)."""

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._digests: dict[str, str] | None = None
        self._mode_checked = False

    @staticmethod
    def _parameter_digests(model: nn.Module) -> dict[str, str]:
        params = {n for n, _ in model.named_parameters()}
        return {k: v for k, v in base_digests(model).items() if k in params}

    def before_train(self, runner) -> None:
        self._digests = self._parameter_digests(unwrap(runner.model))
        self._mode_checked = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._mode_checked:  # the loop has put the model in train mode by now
            return
        self._mode_checked = True
        norms = frozen_norms_in_train_mode(unwrap(runner.model))
        if norms:
            runner.logger.warning(
                f'FLoRAHook: {len(norms)} batch-norm layers of the frozen backbone run in train '
                f'mode (e.g. {norms[:3]}): their running statistics adapt to this data (buffers, '
                'not weights). Set the backbone\'s norm_eval=True to keep the pretrained ones.')

    def after_train(self, runner) -> None:
        if self._digests is None:
            return
        now = self._parameter_digests(unwrap(runner.model))
        changed = [k for k, v in self._digests.items() if now.get(k) != v]
        if changed:
            raise RuntimeError(f'FLoRAHook: {len(changed)} frozen base tensors changed '
                               f'during training, e.g. {changed[:5]}')
        runner.logger.info(f'FLoRAHook: {len(now)} frozen base tensors unchanged')
