"""What a PEFT run trains, read off an injected model: the parameter table per part, tensors
that train against the method's choice, and the size of the update per stage.

Used by FLoRAHook (logs and checks during training) and by ``flora_mm.apis.count_params``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from .api import adapter_layers, injected_roots
from .base import injection_state
from .norms import update_sq_norm

#: stage names of ConvNeXt (``stages.N``), ViTs (``blocks.N``) and HF-style encoders
DEFAULT_GROUP = r'(stages\.\d+|blocks\.\d+|layers\.\d+)'


def parameter_table(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(part, method, total, trainable) per top-level child of the model."""
    methods = {name: m.name for name, _, m in injected_roots(model)}
    rows = []
    for part, module in model.named_children():
        params = list(module.parameters())
        if not params:
            continue
        method = ', '.join(sorted({v for k, v in methods.items()
                                   if k == part or k.startswith(part + '.')})) or '-'
        rows.append((part, method, sum(p.numel() for p in params),
                     sum(p.numel() for p in params if p.requires_grad)))
    return rows


def format_table(rows: list[tuple[str, str, int, int]]) -> str:
    """``parameter_table`` rows as a fixed-width table with a total line."""
    lines = [f'{"part":<18}{"method":<10}{"total":>15}{"trainable":>15}{"%":>8}']
    for part, method, total, trainable in rows:
        lines.append(f'{part:<18}{method:<10}{total:>15,}{trainable:>15,}'
                     f'{100.0 * trainable / max(total, 1):>8.2f}')
    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    lines.append(f'{"all":<18}{"":<10}{total:>15,}{trainable:>15,}'
                 f'{100.0 * trainable / max(total, 1):>8.2f}')
    return '\n'.join(lines)


def unexpected_trainable(model: nn.Module) -> tuple[list[str], list[str]]:
    """(trainable tensors the method did not choose, method tensors that are frozen)."""
    extra, frozen = [], []
    for root_name, root, _ in injected_roots(model):
        prefix = f'{root_name}.' if root_name else ''
        chosen = set(injection_state(root).trainable)
        for name, param in root.named_parameters():
            if param.requires_grad and name not in chosen:
                extra.append(prefix + name)
            elif not param.requires_grad and name in chosen:
                frozen.append(prefix + name)
    return extra, frozen


def update_norms(model: nn.Module,
                 group_pattern: str | Callable[[str], str] = DEFAULT_GROUP) -> dict[str, float]:
    """||s * dW||_F per stage (square root of the summed squares of its layers). The stage of
    a layer: group 1 of ``group_pattern`` on its name ('other' where it does not match), or
    ``group_pattern(name)`` (the hooks ask the backbone's description).

    Closed forms where they exist (FLoRA, LoRA: ``flora_mm.peft.norms``), no full-size dW;
    works on FSDP-sharded adapters (call on every rank then).
    """
    sums: dict[str, float] = OrderedDict()
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            if callable(group_pattern):
                group = group_pattern(name)
            else:
                match = re.search(group_pattern, name)
                group = match.group(1) if match else 'other'
            sums[group] = sums.get(group, 0.0) + float(update_sq_norm(layer))
    return {k: v ** 0.5 for k, v in sums.items()}
