"""A linear layer plus a factored low-rank update, ``x W^T + b + (x down) up``, in as few
passes over the full-size tensors as the maths allows.

Composed from autograd's own ops the layer costs two avoidable passes in backward (measured
on the project's CPU machine, docs/performance.md):

* the input gradient is ``g W + (g up^T) down^T``; autograd computes the two terms as separate
  full-size tensors and adds them. Here the thin term is accumulated in place into ``g W``.
* the factors' gradients are thin GEMMs over all rows. torch's ``mm`` backward picks the
  orientation from the factor's strides and for ``down`` (and a column-major ``up``) computes
  ``x^T (g up^T)``, which reads the full-size operand transposed: 2x slower on MKL than the same
  product as ``((g up^T)^T x)^T``, whose transposed operand is the thin one.

No library has this fused form for an arbitrary (in x r, r x out) factor pair; the adapters
hand it their ``linear_factors()``.
"""
from __future__ import annotations

import torch


def factored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias + (x @ down) @ up`` for 2-D ``x`` (rows x in); every tensor in one
    dtype. Same values as the composed form; gradients for whichever inputs require them."""
    return _FactoredLinear.apply(x, weight, bias, down, up)


class _FactoredLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        thin = x @ down  # rows x r
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(thin, up)  # the update accumulated into the base output, no second tensor
        ctx.save_for_backward(x, weight, down, up, thin)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, down, up, thin = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_up = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = grad_down = grad_up = None
        grad = grad.contiguous()
        grad_thin = grad @ up.t() if (need_x or need_down) else None  # rows x r
        if need_x:
            grad_x = grad @ weight
            grad_x.addmm_(grad_thin, down.t())
        if need_weight:
            grad_weight = grad.t() @ x
        if need_bias and ctx.has_bias:
            grad_bias = grad.sum(0)
        if need_down:
            grad_down = (grad_thin.t() @ x).t()  # the thin operand transposed (module docstring)
        if need_up:
            grad_up = thin.t() @ grad
        return grad_x, grad_weight, grad_bias, grad_down, grad_up
