"""Products of a low-precision input with higher-precision adapter tensors that keep the input
itself for backward, not its cast copy.

FLoRA's factors stay fp32 on a bf16 backbone (InternViT-6B's layout) so that the update is
summed in fp32. Composed from autograd's ops, ``x.to(fp32) @ down`` (or the first conv of a
factored conv update) keeps the fp32 copy of every adapted layer's input for the factor's
gradient: twice the bf16 input, per layer and step. The rebuilt-input hooks
(``ops.recomputed_input``) can replace the input they know, not a copy made of it. Here the cast
happens inside the op, and backward casts again. torch has no such op (autocast casts the
other way, to the low precision).
"""
from __future__ import annotations

from typing import Sequence

import torch


def cast_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x.to(weight.dtype) @ weight``, keeping ``x`` itself for backward."""
    return _CastMatmul.apply(x, weight)


class _CastMatmul(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x.to(weight.dtype) @ weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.t()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # the thin operand transposed (ops.factored_linear's docstring)
            grad_weight = (grad.t() @ x.to(weight.dtype)).t()
        return grad_x, grad_weight


def cast_conv(x: torch.Tensor, weight: torch.Tensor, stride: int | Sequence[int] = 1,
              padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
              groups: int = 1) -> torch.Tensor:
    """``convNd(x.to(weight.dtype), weight)`` with zero padding given as numbers, keeping
    ``x`` itself for backward; ``x`` batched or not."""
    dims = weight.dim() - 2

    def expand(value: int | Sequence[int], what: str) -> tuple[int, ...]:
        value = (value,) * dims if isinstance(value, int) else tuple(value)
        if len(value) != dims or not all(isinstance(v, int) for v in value):
            raise ValueError(f'cast_conv: {what} must be an int or {dims} ints, got {value!r}')
        return value

    if x.dim() not in (dims + 1, dims + 2):
        raise ValueError(f'cast_conv: a {dims}-D conv needs a {dims + 1}-D (unbatched) or '
                         f'{dims + 2}-D input, got {x.dim()}-D')
    conv = (expand(stride, 'stride'), expand(padding, 'padding'), expand(dilation, 'dilation'),
            groups)
    if x.dim() == dims + 1:  # unbatched, as torch's convs take it
        return _CastConv.apply(x.unsqueeze(0), weight, *conv).squeeze(0)
    return _CastConv.apply(x, weight, *conv)


class _CastConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, False, (0,) * len(stride), groups)
        return torch.convolution(x.to(weight.dtype), weight, None, *ctx.conv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x.to(weight.dtype), weight, None, *ctx.conv, (need_x, need_weight, False))
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None, None, None, None
