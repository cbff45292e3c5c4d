"""The model a config describes, with its PEFT method injected, built without a Runner.

count_params builds it on the meta device without reading any checkpoint; merge builds it on
the CPU to load and merge trained weights. A method comes either from ``type='PEFTBackbone'``
(injected at build time) or from ``custom_hooks=[dict(type='FLoRAHook', peft=..., parts=...)]``
(injected here through the same function the hook uses in ``before_run``).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from ..models.meta import meta_device
from ..peft import inject_into_parts, normalize_parts
from .config import get_scope


def is_flora_hook(hook_cfg) -> bool:
    return (isinstance(hook_cfg, dict)
            and str(hook_cfg.get('type', '')).split('.')[-1] == 'FLoRAHook')


def hook_peft_cfgs(cfg: Config) -> list[tuple[dict, list[str]]]:
    """(peft config, parts) of every FLoRAHook in ``custom_hooks`` that injects by itself."""
    return [(hook['peft'], normalize_parts(hook.get('parts', ('backbone',))))
            for hook in cfg.get('custom_hooks', None) or []
            if is_flora_hook(hook) and hook.get('peft') is not None]


def peft_backbone_cfg(cfg: Config) -> Optional[dict]:
    """The ``PEFTBackbone`` dict of ``cfg.model.backbone``, or None."""
    backbone = cfg.model.get('backbone', None)
    if isinstance(backbone, dict) and backbone.get('type') == 'PEFTBackbone':
        return backbone
    return None


def build_model(cfg: Config, load_pretrained: bool = True, meta: bool = False) -> nn.Module:
    """Build ``cfg.model`` with its PEFT method injected.

    ``load_pretrained``: PEFTBackbone loads the backbone's pretrained ``init_cfg`` before
    injecting (needed when the trained file holds the adapters only); models adapted by a
    FLoRAHook get ``init_weights()`` after injection, as the Runner does. ``meta``: build every
    parameter on the meta device (no memory, no checkpoint read; ``flora_mm.models.meta_device``):
    for counting only.
    """
    if meta and load_pretrained:
        raise ValueError('a model built on the meta device cannot load pretrained weights')
    model_cfg = copy.deepcopy(cfg.model)
    if peft_backbone_cfg(cfg) is not None:
        model_cfg.backbone['load_pretrained'] = load_pretrained
    init_default_scope(get_scope(cfg))
    with meta_device() if meta else contextlib.nullcontext():
        model = MODELS.build(model_cfg)
    hooks = hook_peft_cfgs(cfg)
    for peft, parts in hooks:
        inject_into_parts(model, peft, parts)
    if hooks and load_pretrained and hasattr(model, 'init_weights'):
        model.init_weights()
    return model
