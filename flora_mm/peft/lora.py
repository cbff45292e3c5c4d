"""LoRA (Hu et al. 2021; FLoRA paper eq. 1-3) on the same mechanism as FLoRA.

Linear: ``dW = (alpha / r) * B A`` with A (r x in), B (out x r), run factored on wide layers.
Conv: the same matrix over the flattened weight (out x (in/groups)*k*...) reshaped to the weight's
shape (paper eq. 3), one convolution with W0 + dW. Because the input side is in/groups, grouped
and depthwise convs are adapted and merge exactly (peft's conv LoRA cannot merge them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import (AdapterLayer, LinearFactors, PEFTMethod, check_number, check_positive_int,
                   kaiming_uniform_)


#: peft's ``LoraConfig.lora_alpha`` default: scaling alpha / r = 8 / r
DEFAULT_ALPHA = 8.0


class LoRALayer(AdapterLayer):
    adapter_prefixes = ('lora_A', 'lora_B')

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = DEFAULT_ALPHA,
                 dropout: float = 0.0) -> None:
        super().__init__(base, dropout=dropout)
        shape = self.weight.shape
        fan_in = math.prod(shape[1:])  # (in/groups) * kernel volume
        self.rank = int(rank)
        # peft: scaling = lora_alpha / r; alpha=None keeps the older alpha = r (scaling 1)
        self.scaling = (float(alpha) if alpha is not None else float(rank)) / self.rank
        dev = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, fan_in, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(shape[0], self.rank, device=dev,
                                               dtype=torch.float32))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """peft's init: A kaiming-uniform, B = 0, so injection changes no output."""
        kaiming_uniform_(self.lora_A)
        self.lora_B.zero_()

    def lora_matrix(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.weight.shape)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_matrix()

    def factored_rank(self) -> int | None:
        return self.rank if self.kind == 'Linear' else None

    def factored_conv_rank(self) -> int | None:
        return self.rank if self.kind != 'Linear' else None

    def conv_factors(self) -> tuple[None, torch.Tensor, torch.Tensor] | None:
        """conv(x, dW) = up(kernel(x)): kernel = A as an r-channel conv with the layer's
        geometry, up = scaling B as a pointwise conv (peft's LoRA conv)."""
        if self.kind == 'Linear':
            return None
        ones = (1,) * (self.weight.dim() - 2)
        return (None, self.lora_A.view(self.rank, *self.weight.shape[1:]),
                (self.scaling * self.lora_B).view(*self.lora_B.shape, *ones))

    def linear_factors(self) -> LinearFactors:
        """x dW^T = scaling (x A^T) B^T: down = A^T (in x r), no core, up = B^T (r x out)."""
        return LinearFactors(self.lora_A.transpose(0, 1), None, self.lora_B.transpose(0, 1),
                             self.scaling)

    def closed_form_sq_norm(self) -> torch.Tensor | None:
        """``lora_sq_norm`` of the layer's factors; None for subclasses whose update is not
        ``scaling * B A`` (DoRA's)."""
        if type(self).delta_weight is not LoRALayer.delta_weight:
            return None
        return lora_sq_norm(self.lora_A, self.lora_B, self.scaling)


def lora_sq_norm(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||scaling * B A||_F^2`` from B^T B and A A^T (both r x r, symmetric): the update is
    never built."""
    a, b = lora_a.float(), lora_b.float()
    return (scaling ** 2) * ((b.transpose(0, 1) @ b) * (a @ a.transpose(0, 1))).sum()


@dataclass
class _LowRankMatrixMethod(PEFTMethod):
    rank: int = 8
    alpha: float | None = DEFAULT_ALPHA
    dropout: float = 0.0

    layer_fields: ClassVar = ('rank', 'alpha', 'dropout')
    budget_rank: ClassVar[str | None] = 'rank'

    @classmethod
    def with_budget_ranks(cls, peft: dict, rank: int, **choices: int | None) -> dict:
        """``alpha`` follows the rank when it equalled it (scaling 1, as in every config
        here); any other alpha is the user's choice and stays."""
        old_rank, alpha = peft.get('rank', cls.rank), peft.get('alpha', None)
        out = super().with_budget_ranks(peft, rank, **choices)
        if alpha is not None and alpha == old_rank:
            out['alpha'] = int(rank)
        return out

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        check_positive_int(cfg['rank'], f'{where}: rank')
        if cfg['alpha'] is not None:
            check_number(cfg['alpha'], f'{where}: alpha (or None for alpha = rank)',
                         positive=True)


@PEFT_METHODS.register_module()
@dataclass
class LoRA(_LowRankMatrixMethod):
    """``rank`` r, ``alpha`` (scaling alpha / r; default 8 as peft's ``lora_alpha``; None means
    alpha = r, i.e. scaling 1)."""

    layer_cls: ClassVar = LoRALayer
    table_order: ClassVar[float] = 3
    plot_style: ClassVar = ('#1f77b4', 'o')
