"""LoKr (LyCORIS ``lokr``, peft ``LoKrConfig``): a Kronecker-product update.

Weight W0 of shape (out, in/groups, k_1, ..., k_d) (a conv) or (out, in) (a linear). The two
channel sizes are split by LyCORIS's ``factorization(dim, factor)`` (:func:`factorization`):
out = a * b, in/groups = c * d (a <= b, c <= d). Then

    dW = s * W1 kron W2,   W1 (a x c),   W2 (b x d x k_1 x ... x k_d),   s = alpha / r

(W1 broadcast over the kernel modes, so dW[(p, q), (u, v), k...] = s W1[p, u] W2[q, v, k...]:
dW has W0's shape). ``alpha=None``: alpha = r. W2 is ``w2_a @ w2_b`` (b x r, r x d*k...),
or with ``use_effective_conv2d`` on a conv with a kernel larger than 1 the Tucker-2 product
``W2[q, v, k...] = sum_{i,j} t2[i, j, k...] w2_a[i, q] w2_b[j, v]`` (t2 r x r x k..., w2_a
r x b, w2_b r x d), or a full matrix. W1 is a full a x c matrix, or with ``decompose_both``
``w1_a @ w1_b`` (a x r, r x c).

Full or low-rank: a factor is kept whole where its rank-r form would hold at least as many
tensors: W2 full when r (b + d k...) >= b d k... (Tucker: r (b + d) + r^2 k... >= b d k...),
W1 full unless ``decompose_both`` and r (a + c) < a c. peft and LyCORIS switch at
r >= max(b, d) / 2 instead (the same point for a square linear W2); theirs can make a low-rank
pair larger than the full factor and the count drop as r grows, which a budget search cannot
use. peft keeps scaling alpha / r also where both factors are full (LyCORIS sets it to 1
there); here too.

Grouped and depthwise convs: the input mode is in/groups (1 for a depthwise conv, so c = d = 1),
as peft does for Conv1d/Conv2d; the update has W0's shape and merges exactly (LyCORIS used the
full in_channels: LyCORIS #260).

Init (peft's default ``init_weights=True``): W1 = 0 (``w1_a`` = 0 and ``w1_b`` kaiming-uniform
with ``decompose_both``), W2's tensors kaiming-uniform (a = sqrt(5)) on tensors of peft's
shapes, so the update is 0 at injection. (LyCORIS zeroes W2's ``w2_b`` instead.)

No factored form: every path runs one op with W0 + dW. ``||dW||^2 = s^2 ||W1||^2 ||W2||^2``
from the factors (``closed_form_sq_norm``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import AdapterLayer, check_bool, check_positive_int, kaiming_uniform_
from .loha import tucker2
from .lora import DEFAULT_ALPHA, _LowRankMatrixMethod


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into m * n, m <= n. A ``factor`` > 0 that divides it:
    (factor, dimension / factor), ordered. Otherwise the divisors are walked upwards from 1
    while m < n and m <= factor (any m for factor < 0), which ends at m = the largest divisor
    at most min(factor, sqrt(dimension)): 128 -> (8, 16), 360 -> (18, 20), 127 -> (1, 127);
    factor 4: 128 -> (4, 32); factor 8: 250 -> (5, 50); factor 64: 128 -> (2, 64). (peft's
    copy returns (64, 2) for the last: it does not order a dividing factor's pair.)"""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLayer(AdapterLayer):
    adapter_prefixes = ('lokr_w1', 'lokr_w1_a', 'lokr_w1_b', 'lokr_w2', 'lokr_w2_a',
                        'lokr_w2_b', 'lokr_t2')

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = DEFAULT_ALPHA,
                 dropout: float = 0.0, decompose_both: bool = False, decompose_factor: int = -1,
                 use_effective_conv2d: bool = False) -> None:
        super().__init__(base, dropout=dropout)
        shape = tuple(self.weight.shape)
        self.rank = r = int(rank)
        self.scaling = (float(alpha) if alpha is not None else float(rank)) / r
        a, b = factorization(shape[0], decompose_factor)
        c, d = factorization(shape[1], decompose_factor)
        kernel = shape[2:]
        kvol = math.prod(kernel)
        self.kron_shape = ((a, b), (c, d))
        dev = self.weight.device

        def param(*size: int) -> nn.Parameter | None:
            return nn.Parameter(torch.empty(*size, device=dev, dtype=torch.float32))

        for name in self.adapter_prefixes:
            self.register_parameter(name, None)
        if decompose_both and r * (a + c) < a * c:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        else:
            self.lokr_w1 = param(a, c)
        effective = use_effective_conv2d and any(k != 1 for k in kernel)
        low_rank = r * (b + d) + r * r * kvol if effective else r * (b + d * kvol)
        if low_rank >= b * d * kvol:
            self.lokr_w2 = param(b, d, *kernel)
        elif effective:
            self.lokr_t2 = param(r, r, *kernel)
            self.lokr_w2_a, self.lokr_w2_b = param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * kvol)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """peft's init: W1 = 0 (w1_a = 0, w1_b kaiming-uniform), W2's tensors kaiming-uniform."""
        if self.lokr_w1 is not None:
            self.lokr_w1.zero_()
        else:
            self.lokr_w1_a.zero_()
            kaiming_uniform_(self.lokr_w1_b)
        for p in (self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2):
            if p is not None:
                kaiming_uniform_(p)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        """W2 (b x d x k...)."""
        (_, b), (_, d) = self.kron_shape
        kernel = self.weight.shape[2:]
        if self.lokr_w2 is not None:
            return self.lokr_w2
        if self.lokr_t2 is not None:
            return tucker2(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).view(b, d, *kernel)

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.scaling * self.w1(), self.w2()
        (a, b), (c, d) = self.kron_shape
        kernel = self.weight.shape[2:]
        # (a, c) x (b, d, k...) -> (a, b, c, d, k...) -> (a b, c d, k...)
        w2 = w2.reshape(b, d, -1)
        out = w1[:, None, :, None, None] * w2[None, :, None, :, :]
        return out.reshape(a * b, c * d, *kernel)

    def closed_form_sq_norm(self) -> torch.Tensor:
        """``||s W1 kron W2||^2 = s^2 ||W1||^2 ||W2||^2``; low-rank factors through their
        r x r Grams."""
        def sq(full, left, right):  # ||full||^2 or ||left @ right||^2
            if full is not None:
                return full.float().pow(2).sum()
            left, right = left.float(), right.float()
            return ((left.transpose(0, 1) @ left) * (right @ right.transpose(0, 1))).sum()

        w1 = sq(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b)
        if self.lokr_t2 is not None:
            w2 = self.w2().float().pow(2).sum()
        else:
            w2 = sq(self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b)
        return self.scaling ** 2 * w1 * w2


@PEFT_METHODS.register_module()
@dataclass
class LoKr(_LowRankMatrixMethod):
    """``rank`` r of the low-rank factors, ``alpha`` (scaling alpha / r; default 8 as peft's
    LoKr, None: alpha = r), ``decompose_factor`` (LyCORIS/peft: -1 splits each channel size
    near its square root, f > 0 as (f, size / f)), ``decompose_both`` (W1 low-rank too),
    ``use_effective_conv2d`` (W2 as a Tucker-2 product with a full spatial core).

    A budget solves ``rank`` and tries the factors in ``budget_rank_choices``: W1 kron W2 holds
    at most a c + b d k... ~ |W| / f^2 tensors per layer, so a large budget needs a small f
    (-1 is not tried: its count is about sqrt(|W|) per layer)."""

    decompose_both: bool = False
    decompose_factor: int = -1
    use_effective_conv2d: bool = False

    layer_cls: ClassVar = LoKrLayer
    layer_fields: ClassVar = ('rank', 'alpha', 'dropout', 'decompose_both', 'decompose_factor',
                              'use_effective_conv2d')
    budget_rank_choices: ClassVar[dict[str, tuple[int, ...]]] = {'decompose_factor': (2, 4, 8)}
    table_order: ClassVar[float] = 5.75
    plot_style: ClassVar = ('#008b8b', 'P')

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        for name in ('decompose_both', 'use_effective_conv2d'):
            check_bool(cfg, name, where)
        factor = cfg['decompose_factor']
        if factor != -1:
            check_positive_int(factor, f'{where}: decompose_factor (or -1)')
