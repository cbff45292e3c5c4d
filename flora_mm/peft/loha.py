"""LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS ``loha``, peft ``LoHaConfig``).

Weight W0 of shape (out, in/groups, k_1, ..., k_d) (a conv) or (out, in) (a linear); scaling
``s = alpha / r`` (``alpha=None``: alpha = r, scaling 1).

- Flattened form (linears, 1x1 convs, and every conv unless ``use_effective_conv2d``):
  ``dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` (element-wise product of two rank-r products) over
  the weight flattened to out x (in/groups * k_1 * ... * k_d), reshaped to W0's shape; w*_a
  (out x r), w*_b (r x in/groups*k...).
- ``use_effective_conv2d`` (peft's name; LyCORIS's ``use_tucker``; here for Conv1d/2d/3d with a
  kernel larger than 1): each factor is a Tucker-2 product with a full spatial core,
  ``R_n[o, i, k...] = sum_{a,b} t_n[a, b, k...] w_n_a[a, o] w_n_b[b, i]`` with t_n
  (r x r x k...), w_n_a (r x out), w_n_b (r x in/groups), and ``dW = s * R_1 * R_2``.

Grouped and depthwise convs: the update has the weight's own shape, with in/groups (1 for a
depthwise conv) as its input mode, one dW for all groups as W0 is; it merges exactly (peft sizes
its factors the same way; LyCORIS used the full in_channels, LyCORIS #260).

Init (peft's default ``init_weights=True``, FedPara's He init): w1_a, w1_b, w2_a (and t1, t2)
kaiming-uniform with a = sqrt(5) on tensors of peft's shapes (so the same fan-ins), w2_b = 0, so
the update is 0 at injection. (LyCORIS instead draws normals and zeroes w2_a.)

The Hadamard product has no cheap factored form (its rank is up to r^2): every path runs one
op with W0 + dW, and the update's norm is taken from the materialised update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import AdapterLayer, check_bool, kaiming_uniform_
from .lora import DEFAULT_ALPHA, _LowRankMatrixMethod


def tucker2(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """``R[o, i, k...] = sum_{a,b} core[a, b, k...] out_factor[a, o] in_factor[b, i]``, core
    (r_a x r_b x k...), out_factor (r_a x out), in_factor (r_b x in)."""
    inner = core.movedim(1, -1) @ in_factor                      # (a, k..., i)
    inner = inner.movedim(-1, 1)                                 # (a, i, k...)
    out = out_factor.transpose(0, 1) @ inner.reshape(core.shape[0], -1)
    return out.view(out_factor.shape[1], in_factor.shape[1], *core.shape[2:])


class LoHaLayer(AdapterLayer):
    adapter_prefixes = ('hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b', 'hada_t1',
                        'hada_t2')

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = DEFAULT_ALPHA,
                 dropout: float = 0.0, use_effective_conv2d: bool = False) -> None:
        super().__init__(base, dropout=dropout)
        shape = tuple(self.weight.shape)
        self.rank = r = int(rank)
        self.scaling = (float(alpha) if alpha is not None else float(rank)) / r
        self.effective = bool(use_effective_conv2d) and any(k != 1 for k in shape[2:])
        dev = self.weight.device

        def param(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*size, device=dev, dtype=torch.float32))

        if self.effective:
            self.hada_w1_a, self.hada_w1_b = param(r, shape[0]), param(r, shape[1])
            self.hada_w2_a, self.hada_w2_b = param(r, shape[0]), param(r, shape[1])
            self.hada_t1, self.hada_t2 = param(r, r, *shape[2:]), param(r, r, *shape[2:])
        else:
            fan_in = math.prod(shape[1:])
            self.hada_w1_a, self.hada_w1_b = param(shape[0], r), param(r, fan_in)
            self.hada_w2_a, self.hada_w2_b = param(shape[0], r), param(r, fan_in)
            self.register_parameter('hada_t1', None)
            self.register_parameter('hada_t2', None)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """peft's init: everything kaiming-uniform (a = sqrt(5)) but w2_b = 0."""
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_t1, self.hada_t2):
            if p is not None:
                kaiming_uniform_(p)
        self.hada_w2_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        if self.effective:
            first = tucker2(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = tucker2(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return self.scaling * first * second
        first = self.hada_w1_a @ self.hada_w1_b
        second = (self.scaling * self.hada_w2_a) @ self.hada_w2_b
        return (first * second).view(self.weight.shape)


@PEFT_METHODS.register_module()
@dataclass
class LoHa(_LowRankMatrixMethod):
    """``rank`` r of each of the two products, ``alpha`` (scaling alpha / r; default 8 as
    peft's LoHa, None: alpha = r), ``use_effective_conv2d`` (peft's option: Tucker-2 factors
    with full spatial cores on convs with a kernel; default False as in peft)."""

    use_effective_conv2d: bool = False

    layer_cls: ClassVar = LoHaLayer
    layer_fields: ClassVar = ('rank', 'alpha', 'dropout', 'use_effective_conv2d')
    table_order: ClassVar[float] = 5.5
    plot_style: ClassVar = ('#e377c2', 'X')

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        check_bool(cfg, 'use_effective_conv2d', where)
