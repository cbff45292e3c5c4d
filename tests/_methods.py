"""The PEFT methods the shared tests run over, read from the registry, and their helpers.

Every registered method is tested (``method_names()``, in table order); what a test needs to
know about a method beyond what the method class declares (``budget_rank``, ``layer_cls``, ...)
is a :class:`MethodSpec` here: formulas written from the papers, independent of flora_mm, that
the tests check the implementation against. A method registered elsewhere (tests/
test_toy_method.py) adds its spec with ``add_spec`` and is picked up by the same tests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from flora_mm.peft import PEFTMethod, adapter_layers
from flora_mm.registry import PEFT_METHODS


@dataclass(frozen=True)
class MethodSpec:
    """What the shared tests know about one method, from its paper."""

    name: str
    #: settings every test config of the method gets (a file's own settings win)
    settings: dict = field(default_factory=dict)
    #: random values of the method's fields besides its budget rank (property test)
    random_settings: Optional[Callable[[random.Random], dict]] = None
    #: W0 + the layer's update, computed from its tensors by the method's formula
    reference_weight: Optional[Callable[[nn.Module], torch.Tensor]] = None
    #: tensors the method adds to one target layer: (d_out, d_in / groups, kernel size or
    #: None for a Linear, rank, second rank) -> count
    layer_count: Optional[Callable[[int, int, Optional[int], int, int], int]] = None


# ----------------------------------------------------------------------------- FLoRA, LoRA, DoRA
def _flora_weight(layer) -> torch.Tensor:
    w0 = layer.weight.detach().float()
    delta = layer.flora_core.detach()
    for mode, factor in enumerate(layer.flora_factors):  # n-mode products G x_n U_n
        delta = torch.movedim(torch.tensordot(factor.detach(), delta, dims=([1], [mode])),
                              0, mode)
    return w0 + layer.scale * delta


def _lora_weight(layer) -> torch.Tensor:
    w0 = layer.weight.detach().float()
    return w0 + (layer.lora_B.detach() @ layer.lora_A.detach()).view_as(w0) * layer.scaling


def _dora_weight(layer) -> torch.Tensor:
    w0 = layer.weight.detach().float()
    directional = _lora_weight(layer)
    norm = directional.flatten(1).norm(dim=1).view(-1, *([1] * (w0.dim() - 1)))
    return layer.dora_magnitude.detach().view_as(norm) * directional / norm


def _flora_count(d_out: int, d_in: int, k: Optional[int], rank: int, kernel_rank: int) -> int:
    """Paper §4.1: a conv adds r1 r2 r3^2 + r1 d_out + r2 d_in + 2 r3 k, a linear
    r1 r2 + r1 d_out + r2 d_in, every rank clamped to its mode's size."""
    r1, r2 = min(rank, d_out), min(rank, d_in)
    if k is None:
        return r1 * r2 + r1 * d_out + r2 * d_in
    r3 = min(kernel_rank, k)
    return r1 * r2 * r3 * r3 + r1 * d_out + r2 * d_in + 2 * r3 * k


def _lora_count(d_out: int, d_in: int, k: Optional[int], rank: int, _: int) -> int:
    """LoRA eq. 3 on the reshaped update: r (d_in k^2 + d_out)."""
    return rank * (d_in * (k * k if k else 1) + d_out)


SPECS: dict[str, MethodSpec] = {
    'FLoRA': MethodSpec(
        'FLoRA', reference_weight=_flora_weight, layer_count=_flora_count,
        random_settings=lambda rng: dict(kernel_rank=rng.randint(1, 7),
                                         scale=rng.choice([0.04, 0.4, 1.0, 4.0]))),
    'LoRA': MethodSpec(
        'LoRA', reference_weight=_lora_weight, layer_count=_lora_count,
        random_settings=lambda rng: dict(alpha=rng.choice([None, 1.0, 16.0]))),
    'DoRA': MethodSpec(  # one magnitude per output channel on top of LoRA
        'DoRA', reference_weight=_dora_weight,
        layer_count=lambda d_out, d_in, k, r, r2: _lora_count(d_out, d_in, k, r, r2) + d_out,
        random_settings=lambda rng: dict(alpha=rng.choice([None, 1.0, 16.0]))),
}


def add_spec(spec: MethodSpec) -> None:
    """Tell the shared tests about a method registered outside flora_mm."""
    SPECS[spec.name] = spec


def spec(name: str) -> MethodSpec:
    return SPECS.get(name) or MethodSpec(name)


# ----------------------------------------------------------------------------- the registry
def method_cls(name: str) -> type[PEFTMethod]:
    return PEFT_METHODS.get(name)


def method_names() -> list[str]:
    """Every registered method once (no aliases), in table order."""
    classes = sorted(dict.fromkeys(PEFT_METHODS.module_dict.values()),
                     key=lambda cls: cls.table_order)
    return [cls.__name__ for cls in classes]


def adapter_methods() -> list[str]:
    """Methods that add tensors (an adapter layer)."""
    return [n for n in method_names() if method_cls(n).layer_cls is not None]


def rank_methods() -> list[str]:
    """Methods a parameter budget can be solved for."""
    return [n for n in method_names() if method_cls(n).budget_rank is not None]


def second_rank(name: str) -> tuple[Optional[str], tuple[int, ...]]:
    """The method's second budget rank and its default candidates, or (None, ())."""
    return next(iter(method_cls(name).budget_rank_choices.items()), (None, ()))


def method_config(name: str, rank: Optional[int] = None, second: Optional[int] = None,
                  targets: Optional[dict] = None, **settings) -> dict:
    """A config dict of the method: its spec's settings, ``targets`` (methods that select
    layers), ``settings``, and for rank methods ``rank`` (and the second rank) set as the
    method sets them."""
    cls = method_cls(name)
    cfg = dict(type=name, **spec(name).settings)
    if targets is not None and cls.uses_targets:
        cfg['targets'] = targets
    cfg.update(settings)
    if rank is not None and cls.budget_rank is not None:
        field_name = second_rank(name)[0]
        choices = {field_name: second} if field_name is not None else {}
        cfg = cls.with_budget_ranks(cfg, rank, **choices)
    return cfg


def method_table(rank: int, second: Optional[int] = None, targets: Optional[dict] = None,
                 settings: Optional[dict] = None,
                 methods: Optional[list[str]] = None) -> dict[str, dict]:
    """``{name: method_config(...)}`` for ``methods`` (default: every registered one);
    ``settings`` maps a method name to its settings in this table."""
    settings = settings or {}
    return {name: method_config(name, rank, second, targets, **settings.get(name, {}))
            for name in (methods if methods is not None else method_names())}


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def randomize_adapters(module: nn.Module, seed: int | torch.Generator = 1,
                       std: float = 0.2) -> None:
    """Give every adapter tensor random values, so the update is not zero (FLoRA's core and
    LoRA's B start at zero): N(0, std) noise; 1-D tensors are per-channel scales (DoRA's
    magnitude) and are scaled by 1 + |noise| / 10 instead, so they stay positive."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(module):
        for _, param in layer.adapter_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            if param.dim() == 1:
                param.mul_(1 + 0.1 * noise.abs())
            else:
                param.copy_(noise)


def closed_form(layers: list, method: str, rank: int, second: int = 2) -> int:
    """Tensors ``method`` adds to ``layers`` ((d_out, d_in / groups, kernel or None) each)."""
    count = spec(method).layer_count
    assert count is not None, f'no closed-form count for {method} in tests/_methods.py'
    return sum(count(d_out, d_in, k, rank, second) for d_out, d_in, k in layers)


__all__ = ['MethodSpec', 'SPECS', 'add_spec', 'spec', 'method_cls', 'method_names',
           'adapter_methods', 'rank_methods', 'second_rank', 'method_config', 'method_table',
           'randomize_adapters', 'closed_form']


def classification_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                          optimizer: torch.optim.Optimizer) -> list[float]:
    """``steps`` optimizer steps of cross-entropy on (x, y); the loss before each step."""
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
