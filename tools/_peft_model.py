"""Model building shared by tools/count_params.py and tools/merge_adapters.py.

Both tools need the model a config describes WITH its PEFT method injected, but without a
Runner (no work_dir, data, optimizer or distributed setup): count_params builds it on the meta
device without reading any checkpoint, merge_adapters builds it on the CPU to load and merge
trained weights. A method comes either from ``type='PEFTBackbone'`` (injected at build time) or
from ``custom_hooks=[dict(type='FLoRAHook', peft=..., parts=...)]`` (injected here the way the
hook does it in ``before_run``).
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Optional, Sequence

import _common as common  # noqa: F401  (imports flora_mm first: compat shims + registration)

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from torch import nn

from flora_mm.peft import build_peft_method, injected_roots


def load_tool_config(config: str | Config, cfg_options: Optional[dict] = None) -> Config:
    """Config.fromfile (or a copy of a loaded Config) + --cfg-options, with the config's
    package registered.

    Unlike ``_common.load_config`` this sets no launcher or work_dir: a tool that writes the
    config back (merge_adapters) must not add keys the user never set.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    else:
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = common.get_scope(cfg)
    common.register_scope(scope)
    return cfg


def is_flora_hook(hook_cfg) -> bool:
    return isinstance(hook_cfg, dict) and str(hook_cfg.get('type', '')).split('.')[-1] == 'FLoRAHook'


def hook_peft_cfgs(cfg: Config) -> list[tuple[dict, list[str]]]:
    """(peft config, parts) of every FLoRAHook in ``custom_hooks`` that injects by itself."""
    out = []
    for hook in cfg.get('custom_hooks', None) or []:
        if is_flora_hook(hook) and hook.get('peft') is not None:
            parts = hook.get('parts', ('backbone',))
            out.append((hook['peft'], [parts] if isinstance(parts, str) else list(parts)))
    return out


def build_model(cfg: Config, load_pretrained: bool = True, meta: bool = False) -> nn.Module:
    """Build ``cfg.model`` with its PEFT method injected.

    ``load_pretrained``: PEFTBackbone loads the backbone's pretrained ``init_cfg`` before
    injecting (needed when the trained file holds the adapters only); models adapted by a
    FLoRAHook get ``init_weights()`` after injection, as the Runner does. ``meta``: build every
    tensor on the meta device (no memory, no checkpoint read): for counting only.
    """
    if meta and load_pretrained:
        raise ValueError('a model built on the meta device cannot load pretrained weights')
    model_cfg = copy.deepcopy(cfg.model)
    backbone = model_cfg.get('backbone', None)
    if isinstance(backbone, dict) and backbone.get('type') == 'PEFTBackbone':
        backbone['load_pretrained'] = load_pretrained
    init_default_scope(common.get_scope(cfg))
    if meta:
        with torch.device('meta'):
            model = MODELS.build(model_cfg)
    else:
        model = MODELS.build(model_cfg)
    injected = {name for name, _, _ in injected_roots(model)}
    for peft, parts in hook_peft_cfgs(cfg):
        for part in parts:
            if part in injected:
                continue
            try:
                module = model.get_submodule(part)
            except AttributeError as err:
                raise AttributeError(f'FLoRAHook parts: the model has no part {part!r}') from err
            build_peft_method(peft).inject(module)
            injected.add(part)
    if hook_peft_cfgs(cfg) and load_pretrained and hasattr(model, 'init_weights'):
        model.init_weights()
    return model


def peft_backbone_cfg(cfg: Config) -> Optional[dict]:
    """The ``PEFTBackbone`` dict of ``cfg.model.backbone``, or None."""
    backbone = cfg.model.get('backbone', None)
    if isinstance(backbone, dict) and backbone.get('type') == 'PEFTBackbone':
        return backbone
    return None

