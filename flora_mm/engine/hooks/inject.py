"""AdapterInjectionHook: adapters for models built without ``PEFTBackbone``."""
from __future__ import annotations

from mmengine.hooks import Hook

from ...peft import build_peft_method, inject_into_parts, normalize_parts
from ...registry import HOOKS
from ._runner import unwrap


@HOOKS.register_module()
class AdapterInjectionHook(Hook):
    """Inject ``peft`` into the model ``parts`` (attribute paths, e.g. 'backbone').

    mmengine builds and wraps the model in ``Runner.__init__`` and builds the optimizer and
    schedulers in ``Runner.train()`` before ``before_run``; so the hook injects in
    ``before_run`` (priority VERY_HIGH: before other hooks cache the model) and then rebuilds
    exactly those with the Runner's own builders (``wrap_model``, ``build_optim_wrapper``,
    ``scale_lr``, ``build_param_scheduler``). Pretrained loading and ``load_from`` / resume
    come after ``before_run`` and so fill the base weights of the adapted model.
    """

    priority = 'VERY_HIGH'

    def __init__(self, peft: dict, parts: list[str] | tuple[str, ...] = ('backbone',)) -> None:
        build_peft_method(peft)  # validate the config now, not after the Runner is built
        self.peft = peft
        self.parts = normalize_parts(parts)

    def before_run(self, runner) -> None:
        from ..fsdp import is_fully_sharded
        if is_fully_sharded(runner.model):
            raise RuntimeError('FLoRAHook(peft=...) injects after the Runner has sharded the '
                               'model (FSDP); build the backbone with type=\'PEFTBackbone\' so '
                               'the adapters exist before sharding')
        model = unwrap(runner.model)
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
