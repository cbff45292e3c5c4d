"""FLoRAHook: the one hook a PEFT config names, composed of the single-concern hooks in
``flora_mm.engine.hooks``.

``custom_hooks=[dict(type='FLoRAHook', ...)]`` runs, in this order at every event:

| switch | hook | concern |
| --- | --- | --- |
| ``peft`` + ``parts`` | ``AdapterInjectionHook`` | inject into models built without PEFTBackbone |
| ``check_trainable`` | ``TrainableSetHook`` | parameter table, trainable set, frozen tensors out of the optimizer |
| ``check_finite`` | ``FiniteCheckHook`` | stop at the first non-finite loss; never save NaN/Inf |
| ``atomic_checkpoints`` | ``PlainCheckpointHook`` | plain, atomic checkpoints; fit checks on load; auto-resume fallback |
| ``exact_resume`` | ``ExactResumeHook`` | random state in checkpoints, restored on resume |
| ``save_adapter``, ``adapter_checkpoint`` | ``AdapterCheckpointHook`` | adapter-only files; loading one for test |
| ``norm_interval`` | ``UpdateNormHook`` | update norms per stage |
| ``check_frozen`` | ``FrozenWeightsHook`` | frozen parameters unchanged at the end |

Each of them is registered too, for configs that want some concerns and not others.
"""
from __future__ import annotations

from mmengine.hooks import Hook

from ..peft import DEFAULT_GROUP
from ..registry import HOOKS
from .hooks import (AdapterCheckpointHook, AdapterInjectionHook, ExactResumeHook,
                    FiniteCheckHook, FrozenWeightsHook, PlainCheckpointHook, TrainableSetHook,
                    UpdateNormHook)


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
        hooks: list[Hook] = []
        if peft is not None:
            hooks.append(AdapterInjectionHook(peft, parts))
        hooks.append(TrainableSetHook(check=check_trainable))
        if check_finite:
            hooks.append(FiniteCheckHook())
        # plain checkpoints always: weights_only loading depends on them; atomic is the switch
        hooks.append(PlainCheckpointHook(atomic=atomic_checkpoints))
        if exact_resume:
            hooks.append(ExactResumeHook())
        hooks.append(AdapterCheckpointHook(save=save_adapter, checkpoint=adapter_checkpoint))
        hooks.append(UpdateNormHook(norm_interval, group_pattern))
        if check_frozen:
            hooks.append(FrozenWeightsHook())
        self.hooks = hooks


def _calls_parts(stage: str):
    def call(self, runner, *args, **kwargs):
        for hook in self.hooks:
            getattr(hook, stage)(runner, *args, **kwargs)
    call.__name__ = call.__qualname__ = stage
    call.__doc__ = f'``{stage}`` of every part hook, in order.'
    return call


for _stage in Hook.stages:
    setattr(FLoRAHook, _stage, _calls_parts(_stage))
