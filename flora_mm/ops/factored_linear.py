"""A linear layer plus a factored low-rank update, ``x W^T + b + scale ((x down) core) up``,
in as few passes over the full-size tensors as the maths allows, keeping nothing the adapter's
own tensors already hold.

Composed from autograd's own ops the layer costs two avoidable passes in backward
(docs/performance.md, "Figures behind the design choices"):

* the input gradient is ``g W + (g up^T) down^T``; autograd computes the two terms as separate
  full-size tensors and adds them. Here the thin term is accumulated in place into ``g W``.
* the factors' gradients are thin GEMMs over all rows. torch's ``mm`` backward picks the
  orientation from the factor's strides and for ``down`` (and a column-major ``up``) computes
  ``x^T (g up^T)``, which reads the full-size operand transposed: slower on MKL than the same
  product as ``((g up^T)^T x)^T``, whose transposed operand is the thin one.

The core (FLoRA's G; None for LoRA) and the scale are passed apart from the factors, and
nothing made of them is kept: a folded factor (``scale G U^T``, r x out) is a new tensor that
backward would keep, per layer and step, where ``down``, ``core`` and ``up`` are
views of the adapter's parameters. Inside, the core is folded into ``down`` (in x r, rebuilt
in backward) and the scale applied as the GEMMs' alpha or to r-sized results, so the GEMMs
over all rows are the same as without a core.

No library has this fused form for an arbitrary factor chain; the adapters hand it their
``linear_factors()``.
"""
from __future__ import annotations

import torch


def factored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    down: torch.Tensor, up: torch.Tensor, core: torch.Tensor | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (x @ down @ core) @ up`` for 2-D ``x`` (rows x in),
    ``down`` (in x r_in), ``core`` (r_in x r_out, or None: the identity), ``up`` (r_out x out);
    every tensor in one dtype. Same values as the composed form; gradients for whichever
    inputs require them."""
    return _FactoredLinear.apply(x, weight, bias, down, core, up, float(scale))


class _FactoredLinear(torch.autograd.Function):
    """The core is folded into ``down`` (``down @ core``: in x r, computed in forward and again
    in backward, never kept), so the row-sized GEMMs are LoRA's: ``x (down core)`` and its
    gradients; the core's and ``down``'s gradients come from the in x r gradient of the
    product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                down: torch.Tensor, core: torch.Tensor | None, up: torch.Tensor,
                scale: float) -> torch.Tensor:
        down_core = down @ core if core is not None else down  # in x r_out
        mid = x @ down_core  # rows x r_out
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(mid, up, alpha=scale)  # the update accumulated into the base output
        ctx.save_for_backward(x, weight, down, core, up, mid)
        ctx.has_bias = bias is not None
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, down, core, up, mid = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_core, need_up, _ = ctx.needs_input_grad
        scale = ctx.scale
        grad_x = grad_weight = grad_bias = grad_down = grad_core = grad_up = None
        grad = grad.contiguous()
        need_factor = need_down or (need_core and core is not None)
        # gradient of mid without the scale (rows x r_out); the scale goes on smaller tensors
        grad_mid = grad @ up.t() if (need_x or need_factor) else None
        if need_x:
            down_core = down @ core if core is not None else down
            grad_x = grad @ weight
            grad_x.addmm_(grad_mid, down_core.t(), alpha=scale)
        if need_weight:
            grad_weight = grad.t() @ x
        if need_bias and ctx.has_bias:
            grad_bias = grad.sum(0)
        if need_factor:
            # in x r_out; the thin operand transposed (module docstring)
            grad_down_core = (grad_mid.t() @ x).t().mul_(scale)
            if core is None:
                grad_down = grad_down_core
            else:
                if need_down:
                    grad_down = grad_down_core @ core.t()
                if need_core:
                    grad_core = down.t() @ grad_down_core
        if need_up:
            grad_up = (mid.t() @ grad).mul_(scale)
        return grad_x, grad_weight, grad_bias, grad_down, grad_core, grad_up, None

