"""The PEFT methods the shared tests run over, read from the registry, and their helpers.

Every registered method is tested (``method_names()``, in table order); what a test needs to
know about a method beyond what the method class declares (``budget_rank``, ``layer_cls``, ...)
is a :class:`MethodSpec` here: formulas written from the papers, independent of flora_mm, that
the tests check the implementation against. A method registered elsewhere (tests/
test_toy_method.py) adds its spec with ``add_spec`` and is picked up by the same tests.
"""
from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- LoCon, LoHa, LoKr
# written from LyCORIS's lycoris/functional/{locon,loha,lokr}.py and peft's tuners/{loha,lokr}
# formulas (einsum / kron as those libraries state them), over the layer's own tensors
def _locon_weight(layer) -> torch.Tensor:
    """LyCORIS LoCon: up @ down reshaped; with a Tucker core, rebuild_tucker's
    einsum('i j ..., i p, j r -> p r ...', mid, up^T, down)."""
    w0 = layer.weight.detach().float()
    up, down = layer.lora_up.detach(), layer.lora_down.detach()
    if layer.lora_mid is None:
        delta = (up @ down).reshape(w0.shape)
    else:
        delta = torch.einsum('ij...,ip,jr->pr...', layer.lora_mid.detach(), up.t(), down)
    return w0 + layer.scaling * delta


def _loha_weight(layer) -> torch.Tensor:
    """FedPara / peft LoHa: (w1a w1b) * (w2a w2b); effective conv: make_weight_cp's
    einsum('i j k l, j r, i p -> p r k l', t, wb, wa) per factor, multiplied."""
    w0 = layer.weight.detach().float()
    t1, t2 = layer.hada_t1, layer.hada_t2
    w1a, w1b = layer.hada_w1_a.detach(), layer.hada_w1_b.detach()
    w2a, w2b = layer.hada_w2_a.detach(), layer.hada_w2_b.detach()
    if t1 is not None:
        delta = (torch.einsum('ij...,jr,ip->pr...', t1.detach(), w1b, w1a)
                 * torch.einsum('ij...,jr,ip->pr...', t2.detach(), w2b, w2a))
    else:
        delta = ((w1a @ w1b) * (w2a @ w2b)).reshape(w0.shape)
    return w0 + layer.scaling * delta


def _lokr_weight(layer) -> torch.Tensor:
    """peft / LyCORIS LoKr: make_kron(w1, w2) = torch.kron(w1 (unsqueezed over the kernel
    modes), w2), w1 = lokr_w1 or w1_a w1_b, w2 = lokr_w2, w2_a w2_b or (Tucker) make_weight_cp's
    einsum('i j ..., i p, j r -> p r ...', t2, w2_a, w2_b)."""
    w0 = layer.weight.detach().float()

    def get(name):
        p = getattr(layer, name)
        return None if p is None else p.detach()

    w1 = get('lokr_w1') if get('lokr_w1') is not None else get('lokr_w1_a') @ get('lokr_w1_b')
    if get('lokr_w2') is not None:
        w2 = get('lokr_w2')
    elif get('lokr_t2') is not None:
        w2 = torch.einsum('ij...,ip,jr->pr...', get('lokr_t2'), get('lokr_w2_a'),
                          get('lokr_w2_b'))
    else:
        w2 = (get('lokr_w2_a') @ get('lokr_w2_b')).reshape(get('lokr_w2_a').shape[0], -1,
                                                           *w0.shape[2:])
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    delta = torch.kron(w1, w2)
    assert delta.shape == w0.shape
    return w0 + layer.scaling * delta


def lycoris_factorization(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's factorization(dim, factor), restated: a dividing factor > 0 gives
    (factor, dim / factor) ordered; otherwise m is the largest divisor of dim at most
    min(factor, sqrt(dim)) (factor < 0: no bound), n = dim / m."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    bound = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    m = max(m for m in range(1, bound + 1) if dim % m == 0)
    return m, dim // m


def _locon_count(d_out: int, d_in: int, k: Optional[int], rank: int, _: int) -> int:
    """LoCon with tucker (the default) on a k x k conv, k > 1: r_o d_out + r_i d_in + r_o r_i k^2
    with the core's ranks r_o = min(r, d_out), r_i = min(r, d_in); LoRA's r (d_in k^2 + d_out)
    on linears and 1x1 convs."""
    if k is not None and k > 1:
        r_out, r_in = min(rank, d_out), min(rank, d_in)
        return r_out * d_out + r_in * d_in + r_out * r_in * k * k
    return rank * (d_in * (k * k if k else 1) + d_out)


def _lokr_count(d_out: int, d_in: int, k: Optional[int], rank: int, factor: int) -> int:
    """W1 (a x c) whole, W2 (b x d k^2) as r (b + d k^2) or whole, whichever is smaller,
    with d_out = a b and d_in = c d split by LyCORIS's factorization(., factor)."""
    (a, b), (c, d) = lycoris_factorization(d_out, factor), lycoris_factorization(d_in, factor)
    kk = k * k if k else 1
    return a * c + min(rank * (b + d * kk), b * d * kk)


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
    'LoCon': MethodSpec(
        'LoCon', reference_weight=_locon_weight, layer_count=_locon_count,
        random_settings=lambda rng: dict(tucker=rng.random() < 0.7,
                                         alpha=rng.choice([None, 1.0, 16.0]))),
    'LoHa': MethodSpec(  # two rank-r products over the flattened weight: 2 r (d_out + d_in k^2)
        'LoHa', reference_weight=_loha_weight,
        layer_count=lambda d_out, d_in, k, r, _: 2 * r * (d_out + d_in * (k * k if k else 1)),
        random_settings=lambda rng: dict(use_effective_conv2d=rng.random() < 0.5,
                                         alpha=rng.choice([None, 1.0, 16.0]))),
    'LoKr': MethodSpec(
        'LoKr', reference_weight=_lokr_weight, layer_count=_lokr_count,
        random_settings=lambda rng: dict(decompose_factor=rng.choice([-1, 2, 3, 4]),
                                         decompose_both=rng.random() < 0.5,
                                         use_effective_conv2d=rng.random() < 0.5,
                                         alpha=rng.choice([None, 1.0, 16.0]))),
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
