"""FLoRA: Tucker-factored low-rank adapters that keep the weight's own shape (paper §4).

For a weight of shape (I_1, ..., I_N) — (out, in/groups, k_1, ..., k_d) for a conv, (out, in) for a
linear — the update is ``s * G x_1 U_1 x_2 ... x_N U_N`` with a core G of shape (J_1, ..., J_N) and
one factor U_n of shape (I_n, J_n) per mode. For grouped/depthwise convs the input mode is
in_channels // groups (1 for depthwise), so the update always has the base weight's shape and
merges exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import (AdapterLayer, LinearFactors, PEFTConfigError, PEFTMethod, check_number,
                   check_positive_int)


def _mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """n-mode product: contract ``tensor``'s ``mode`` with ``matrix``'s columns (I_n x J_n)."""
    moved = tensor.movedim(mode, -1)                 # (..., J_n)
    return (moved @ matrix.transpose(0, 1)).movedim(-1, mode)  # (..., I_n) -> back in place


#: factor initialisations: the authors' kaiming normal (a = sqrt(3)) and unit-norm columns
FLORA_INITS = ('kaiming', 'unit')


class FLoRALayer(AdapterLayer):
    """FLoRA adapter on a Linear or Conv{1,2,3}d layer.

    Conv: one convolution with W0 + s*dW (dW is built from the small factors each forward);
    wide groups=1 convs on small maps run W0 and the update as pointwise-core-pointwise convs
    instead (``uses_factored_conv``).
    Linear: wide layers run x W0^T + (x U_2)(s U_1 G)^T and never build an out x in matrix;
    narrow ones one GEMM with W0 + s*dW, which is cheaper there (``uses_factored_linear``).
    """

    adapter_prefixes = ('flora_core', 'flora_factors')

    def __init__(self, base: nn.Module, rank: int = 16, kernel_rank: int = 2,
                 ranks: Sequence[int] | None = None, scale: float = 1.0, dropout: float = 0.0,
                 init: str = 'kaiming', init_std: float | None = None) -> None:
        super().__init__(base, dropout=dropout)
        shape = tuple(self.weight.shape)
        if ranks is None:
            ranks = [rank, rank] + [kernel_rank] * (len(shape) - 2)
        elif len(ranks) != len(shape):
            raise PEFTConfigError(
                f'ranks={list(ranks)} has {len(ranks)} entries but the {self.kind} weight '
                f'{shape} has {len(shape)} modes (out, in/groups, kernel...)')
        self.ranks = [min(int(r), size) for r, size in zip(ranks, shape)]
        self.clamped = [(m, int(r), size) for m, (r, size) in enumerate(zip(ranks, shape))
                        if int(r) > size]
        self.scale = float(scale)
        dev = self.weight.device
        # adapters stay fp32 even on a bf16/fp16 backbone
        self.flora_core = nn.Parameter(torch.zeros(self.ranks, device=dev, dtype=torch.float32))
        self.flora_factors = nn.ParameterList(
            nn.Parameter(torch.empty(size, r, device=dev, dtype=torch.float32))
            for size, r in zip(shape, self.ranks))
        if init not in FLORA_INITS:
            raise PEFTConfigError(f'init must be one of {FLORA_INITS}, got {init!r}')
        self.init = init
        self.init_std = init_std
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """G = 0 (so injection changes no output), each factor U_n (I_n x J_n) Gaussian.

        ``init='kaiming'`` (default) is the authors' ``nn.init.kaiming_normal_(U_n,
        a=sqrt(3))``: std sqrt(0.5 / J_n), so the paper's ``scale`` values mean what they
        meant there. ``init='unit'``: std 1/sqrt(I_n), every factor column has about unit
        norm and ||dW||_F ~ s * ||G||_F whatever the layer size. ``init_std`` overrides the
        std of every factor.
        """
        self.flora_core.zero_()
        for factor in self.flora_factors:
            if self.init_std is not None:
                factor.normal_(0.0, self.init_std)
            elif self.init == 'unit':
                factor.normal_(0.0, factor.shape[0] ** -0.5)
            else:
                nn.init.kaiming_normal_(factor, a=math.sqrt(3))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * tucker_product(self.flora_core, list(self.flora_factors))

    def factored_rank(self) -> int | None:
        return self.ranks[1] if self.kind == 'Linear' else None

    def linear_factors(self) -> LinearFactors:
        """x dW^T = s x U_2 G^T U_1^T: down = U_2 (in x r2), core = G^T, up = U_1^T."""
        out_factor, in_factor = self.flora_factors  # (out, r1), (in, r2)
        return LinearFactors(in_factor, self.flora_core.transpose(0, 1),
                             out_factor.transpose(0, 1), self.scale)

    def factored_conv_rank(self) -> int | None:
        return max(self.ranks[:2]) if self.kind != 'Linear' else None

    def conv_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """conv(x, s dW) = up(kernel(down(x))): down = U_2^T as a pointwise conv (in -> r2),
        kernel = s G x_3 U_3 ... (r1 x r2 x k...: the core with its spatial modes expanded),
        up = U_1 as a pointwise conv (r1 -> out). Exact for groups=1 with zero padding: the
        pointwise maps commute with it."""
        out_factor, in_factor, *spatial = self.flora_factors
        kernel = self.flora_core
        for mode, factor in enumerate(spatial, start=2):
            kernel = _mode_product(kernel, factor, mode)
        ones = (1,) * len(spatial)
        return (in_factor.transpose(0, 1).reshape(*in_factor.shape[::-1], *ones),
                self.scale * kernel, out_factor.reshape(*out_factor.shape, *ones))

    def closed_form_sq_norm(self) -> torch.Tensor:
        """``flora_sq_norm`` of the layer's core and factors."""
        return flora_sq_norm(self.flora_core, list(self.flora_factors), self.scale)


def flora_sq_norm(core: torch.Tensor, factors: Sequence[torch.Tensor],
                  scale: float) -> torch.Tensor:
    """``||scale * G x_1 U_1 ... x_N U_N||_F^2 = scale^2 <G, G x_1 M_1 ... x_N M_N>`` with the
    Gram matrices ``M_n = U_n^T U_n`` (J_n x J_n): only core-sized tensors are formed."""
    core = core.float()
    t = core
    for mode, factor in enumerate(factors):
        factor = factor.float()
        t = _mode_product(t, factor.transpose(0, 1) @ factor, mode)
    return (scale ** 2) * (core * t).sum()


def tucker_product(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """G x_1 U_1 x_2 ... x_N U_N.

    The kernel and input modes are contracted into the small core first; the output mode comes
    last as ONE matrix product (I_1 x J_1) @ (J_1 x I_2*...*I_N), so the full-size tensor is
    written once, contiguously. (Contracting the channel modes first is fewer flops on paper but
    makes every later mode product a full-size pass plus a copy: slower per step,
    docs/performance.md.)
    """
    partial = core
    for mode in range(core.dim() - 1, 0, -1):
        partial = _mode_product(partial, factors[mode], mode)
    out = factors[0] @ partial.reshape(core.shape[0], -1)
    return out.reshape(factors[0].shape[0], *partial.shape[1:])


@PEFT_METHODS.register_module()
@dataclass
class FLoRA(PEFTMethod):
    """``rank`` for the two channel modes (r1 = r2, as in the paper), ``kernel_rank`` for every
    spatial mode, or ``ranks`` listing every mode explicitly; ``scale`` is the paper's s.

    ``init``: 'kaiming' (the authors' factor init, the default, for which the paper's s values
    hold) or 'unit' (factor std 1/sqrt(I_n)); ``init_std`` sets one std for every factor.
    """

    rank: int = 16
    kernel_rank: int = 2
    ranks: list | None = None
    scale: float = 1.0
    dropout: float = 0.0
    init: str = 'kaiming'
    init_std: float | None = None

    layer_cls: ClassVar = FLoRALayer
    layer_fields: ClassVar = ('rank', 'kernel_rank', 'ranks', 'scale', 'dropout', 'init',
                              'init_std')
    budget_rank: ClassVar[str | None] = 'rank'
    #: kernel ranks a budget tries by default: the paper's r3 in {1, 2}
    budget_rank_choices: ClassVar[dict[str, tuple[int, ...]]] = {'kernel_rank': (1, 2)}
    table_order: ClassVar[float] = 5
    plot_style: ClassVar = ('#d62728', '*')

    @classmethod
    def with_budget_ranks(cls, peft: dict, rank: int, **choices: int | None) -> dict:
        """An explicit ``ranks`` list would override ``rank`` and ``kernel_rank``: refused."""
        if peft.get('ranks') is not None:
            raise PEFTConfigError('FLoRA with an explicit `ranks` list: the solver sets `rank` '
                                  'and `kernel_rank`; remove `ranks` to solve a budget')
        return super().with_budget_ranks(peft, rank, **choices)

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        check_positive_int(cfg['rank'], f'{where}: rank')
        check_positive_int(cfg['kernel_rank'], f'{where}: kernel_rank')
        if cfg['ranks'] is not None:
            if not isinstance(cfg['ranks'], (list, tuple)) or not cfg['ranks']:
                raise PEFTConfigError(f'{where}: ranks must be a list with one rank per mode')
            for r in cfg['ranks']:
                check_positive_int(r, f'{where}: each of ranks')
        check_number(cfg['scale'], f'{where}: scale')
        if cfg['init'] not in FLORA_INITS:
            raise PEFTConfigError(f'{where}: init must be one of {FLORA_INITS}, '
                                  f'got {cfg["init"]!r}')
        if cfg['init_std'] is not None:
            check_number(cfg['init_std'], f'{where}: init_std (or None)', positive=True)
