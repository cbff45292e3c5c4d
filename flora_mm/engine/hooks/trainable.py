"""TrainableSetHook: the run trains exactly what the PEFT method says, and the optimizer
walks nothing else."""
from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper, OptimWrapperDict

from ...peft import count_parameters, format_table, injected_roots, parameter_table
from ...peft import unexpected_trainable
from ...registry import HOOKS
from ._runner import unwrap


def drop_frozen_from_optimizer(runner) -> None:
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
class TrainableSetHook(Hook):
    """Logs total / trainable parameters per part; with ``check`` refuses a run in which
    anything outside the intended set trains (inside adapted parts: exactly the method's
    tensors); takes frozen tensors out of the optimizer."""

    priority = 'VERY_HIGH'

    def __init__(self, check: bool = True) -> None:
        self.check = check

    def before_run(self, runner) -> None:
        model = unwrap(runner.model)
        if not list(injected_roots(model)):
            raise RuntimeError('FLoRAHook: the model has no PEFT method: build the backbone with '
                               "type='PEFTBackbone' or give the hook peft=dict(...)")
        runner.logger.info('FLoRAHook parameters per part:\n'
                           + format_table(parameter_table(model)))
        if self.check:
            extra, frozen = unexpected_trainable(model)
            if extra or frozen:
                raise RuntimeError(
                    f'FLoRAHook: trainable set is not the intended one: {len(extra)} tensors '
                    f'train outside the PEFT method (e.g. {extra[:5]}), {len(frozen)} method '
                    f'tensors are frozen (e.g. {frozen[:5]})')
        drop_frozen_from_optimizer(runner)

    def before_train(self, runner) -> None:
        counts = count_parameters(unwrap(runner.model))
        runner.message_hub.update_info('flora_mm_trainable', counts['trainable'])
