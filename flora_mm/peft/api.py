"""Stable public functions of flora_mm.peft (other modules, tools and tests use these names)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import (AdapterLayer, PEFTConfigError, PEFTMethod, injection_state,
                   set_injection_state)


def build_peft_method(cfg: dict | PEFTMethod) -> PEFTMethod:
    """Build (and so validate) a method from ``dict(type=..., ...)``."""
    if isinstance(cfg, PEFTMethod):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise PEFTConfigError(f'peft config must be a dict with a "type" key, got {cfg!r}')
    cfg = dict(cfg)
    method_type = cfg['type']
    if PEFT_METHODS.get(method_type) is None:
        known = sorted(PEFT_METHODS.module_dict)
        raise PEFTConfigError(f'unknown PEFT method type {method_type!r}; registered: {known}')
    cls = PEFT_METHODS.get(cfg.pop('type'))
    try:
        # called directly, not through Registry.build: under an mmdet/mmseg/mmrotate default
        # scope, build() would warn on every call that the scope has no "peft method" registry
        return cls(**cfg)
    except TypeError as err:  # unknown keyword for this method
        raise PEFTConfigError(f'{method_type}: {err}') from err


def inject_adapters(module: nn.Module, cfg: dict | PEFTMethod) -> list[str]:
    """Adapt ``module`` in place per ``cfg``, freeze it but for the method's tensors, and
    return the names of the adapted (or, for BitFit, targeted) layers."""
    return build_peft_method(cfg).inject(module)


def normalize_parts(parts: str | Sequence[str]) -> list[str]:
    """``'backbone'`` or ``['backbone', 'neck']`` -> a list of attribute paths."""
    return [parts] if isinstance(parts, str) else list(parts)


def inject_into_parts(model: nn.Module, cfg: dict | PEFTMethod,
                      parts: str | Sequence[str] = ('backbone',)
                      ) -> dict[str, list[str] | None]:
    """Inject ``cfg`` into each named part of ``model`` (``FLoRAHook(peft=..., parts=...)``).

    Parts that already carry a method (e.g. a ``PEFTBackbone``) are left alone. Returns
    ``{part: adapted layer names}``, with None for the parts left alone.
    """
    injected = {name for name, _, _ in injected_roots(model)}
    out: dict[str, list[str] | None] = {}
    for part in normalize_parts(parts):
        try:
            module = model.get_submodule(part)
        except AttributeError as err:
            raise AttributeError(f'the model has no part {part!r} to inject adapters into '
                                 '(FLoRAHook parts)') from err
        if part in injected:
            out[part] = None
            continue
        out[part] = inject_adapters(module, cfg)
        injected.add(part)
    return out


def adapter_layers(module: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, sub in module.named_modules():
        if isinstance(sub, AdapterLayer):
            yield name, sub


def injected_roots(module: nn.Module) -> Iterator[tuple[str, nn.Module, PEFTMethod]]:
    """(name, submodule, method) for every submodule adapters were injected into."""
    for name, sub in module.named_modules():
        state = injection_state(sub)
        if state is not None:
            yield name, sub, state.method


def injected_methods(module: nn.Module) -> dict:
    """The injected methods' configs as JSON values, by injected root: what checkpoints and
    adapter files record and compare."""
    import json
    return json.loads(json.dumps({name: method.to_dict()
                                  for name, _, method in injected_roots(module)}, default=str))


def merge_adapters(module: nn.Module) -> None:
    for _, layer in adapter_layers(module):
        layer.merge()


def unmerge_adapters(module: nn.Module) -> None:
    for _, layer in adapter_layers(module):
        layer.unmerge()


@contextmanager
def unmerged(module: nn.Module) -> Iterator[None]:
    """Temporarily unmerge the merged adapter layers of ``module`` (to read or write W0 and the
    adapter tensors consistently); they are merged again on exit."""
    merged = [layer for _, layer in adapter_layers(module) if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        yield
    finally:
        for layer in merged:
            layer.merge()


def reset_adapters_from_base(module: nn.Module) -> None:
    """Re-derive adapter state that depends on W0 (DoRA's magnitude) after W0 was loaded."""
    for _, layer in adapter_layers(module):
        layer.reset_from_base()


def _trainable_names(module: nn.Module) -> list[str]:
    names = []
    for root_name, root, _ in injected_roots(module):
        prefix = f'{root_name}.' if root_name else ''
        names += [prefix + n for n in injection_state(root).trainable]
    return names


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the method's trainable tensors, keyed by their names in ``module``."""
    params = dict(module.named_parameters())
    return {name: params[name].detach() for name in _trainable_names(module)}


def load_adapter_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor],
                            strict: bool = True) -> dict[str, list[str]]:
    """Copy adapter tensors into an injected module; returns missing/unexpected keys.

    Merged layers are unmerged for the copy and merged again, so their weights stay consistent.
    """
    expected = _trainable_names(module)
    if not expected and not state_dict:
        return dict(missing_keys=[], unexpected_keys=[])
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in set(expected)]
    if strict and (missing or unexpected):
        raise KeyError(f'adapter state dict does not fit the model: missing {missing[:10]}'
                       f'{"..." if len(missing) > 10 else ""}, unexpected {unexpected[:10]}'
                       f'{"..." if len(unexpected) > 10 else ""}')
    params = dict(module.named_parameters())
    for key in expected:
        if key in state_dict and tuple(state_dict[key].shape) != tuple(params[key].shape):
            raise ValueError(f'adapter tensor {key}: shape {tuple(state_dict[key].shape)} in the '
                             f'file, {tuple(params[key].shape)} in the model (other rank?)')
    with unmerged(module), torch.no_grad():
        for key in expected:
            if key in state_dict:
                params[key].copy_(state_dict[key])
    return dict(missing_keys=missing, unexpected_keys=unexpected)


def count_parameters(module: nn.Module) -> dict:
    """Total and trainable parameters, and per method: the tensors it trains (``trainable``)
    and those it added to the plain model (``added``)."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    per_method: dict[str, dict[str, int]] = {}
    params = dict(module.named_parameters())
    for root_name, root, method in injected_roots(module):
        prefix = f'{root_name}.' if root_name else ''
        entry = per_method.setdefault(method.name, dict(trainable=0, added=0, layers=0))
        entry['trainable'] += sum(params[prefix + n].numel()
                                  for n in injection_state(root).trainable)
        for _, layer in adapter_layers(root):
            entry['layers'] += 1
            entry['added'] += sum(p.numel() for _, p in layer.adapter_parameters())
    return dict(total=total, trainable=trainable, per_method=per_method)


def remove_adapters(module: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by its plain base layer (merged first unless ``merge`` is
    False, which drops the update), leaving a model vanilla code can load and run."""
    for name, layer in list(adapter_layers(module)):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        base = layer.base_layer
        for pname, param in layer.named_parameters(recurse=False):
            if not pname.startswith(layer.adapter_prefixes):
                setattr(base, pname, param)
        module.set_submodule(name, base)
    for _, sub, _ in list(injected_roots(module)):
        set_injection_state(sub, None)
    return module
