"""A linear or conv layer run with a weight built from other tensors (W0 + dW), whose backward
rebuilds that weight instead of keeping it.

An adapter that materialises its update runs the base op with ``W0 + dW``. Composed from
autograd's ops, the op keeps that weight alive from forward to backward for the input
gradient: one full-size weight per adapted layer and step, which the frozen backbone does not
pay (its op keeps W0, a parameter): most of the adapters' extra activation memory on
ConvNeXt-V2-L (docs/performance.md). Here the op keeps its input
only; backward rebuilds the weight (the small factor products again and one weight-sized
addition, no grad) and passes the weight gradient to the graph that built the weight in
forward, which keeps nothing weight-sized (``W0 + dW``'s addition keeps nothing).

Written by hand because torch's activation checkpointing recomputes a region's saved tensors
through saved-tensor hooks, which do not compose with the hooks the lean ConvNeXt blocks
already put around these layers (``ops.recomputed_input``), and it would recompute the base op too. The
backward computes exactly what autograd's own ``ConvolutionBackward0`` / ``MmBackward0``
compute (same kernels), and the depthwise CPU weight gradient as ``depthwise_conv`` does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import depthwise_conv

#: spatial dims of the convs served (from the type: the base layer's own ``weight`` attribute
#: is not the adapter's, and FSDP2 leaves it unset)
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def recomputed_weight_serves(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear_or_conv_with_recomputed_weight`` can run ``layer`` on ``x``: a plain
    nn.Linear, or an nn.ConvNd with zero padding given as numbers, on a batched input."""
    if type(layer) is nn.Linear:
        return x.dim() >= 1
    dims = _CONV_DIMS.get(type(layer))
    return (dims is not None and x.dim() == dims + 2 and layer.padding_mode == 'zeros'
            and isinstance(layer.padding, tuple))


def linear_or_conv_with_recomputed_weight(layer: nn.Module, x: torch.Tensor,
                                          weight: torch.Tensor,
                                          weight_fn: Callable[[], torch.Tensor],
                                          bias: torch.Tensor | None,
                                          sources: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``layer``'s op (linear, or conv with its stride, padding, dilation and groups) on ``x``
    with ``weight``, which is not kept for backward: backward rebuilds it with ``weight_fn()``
    (without grad) for the input gradient and hands the weight gradient to ``weight``'s own
    graph, which carries it to the tensors the weight was built from.

    ``weight_fn`` must give ``weight`` again. ``sources``, the tensors it reads, are saved for
    their version counters: backward raises if one was modified in place in between.
    """
    if not recomputed_weight_serves(layer, x):
        raise ValueError(f'linear_or_conv_with_recomputed_weight: cannot run a '
                         f'{type(layer).__name__} on a {x.dim()}-D input this way')
    correlation = (isinstance(layer, nn.Conv2d)
                   and depthwise_conv.correlation_weight_grad_serves(layer, x))
    return _RecomputedWeightOp.apply(layer, weight_fn, correlation, x, weight, bias, *sources)


class _RecomputedWeightOp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, layer: nn.Module, weight_fn: Callable[[], torch.Tensor], correlation: bool,
                x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                *sources: torch.Tensor) -> torch.Tensor:
        if type(layer) is nn.Linear:
            out = F.linear(x, weight, bias)
        else:  # the conv's own op: F.convNd with its stride, padding, dilation and groups
            out = layer._conv_forward(x, weight, bias)
        ctx.layer, ctx.weight_fn, ctx.correlation = layer, weight_fn, correlation
        ctx.save_for_backward(x, *sources)  # not the weight
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, *_ = ctx.saved_tensors  # also raises if a source was modified in place
        layer = ctx.layer
        need_x, need_w, need_bias = ctx.needs_input_grad[3:6]
        grad_x = grad_w = grad_bias = None
        w = ctx.weight_fn() if need_x else None  # autograd is off in backward
        if type(layer) is nn.Linear:
            rows = grad.reshape(-1, grad.shape[-1])
            if need_x:
                grad_x = (rows @ w).view(x.shape)
            if need_w:
                grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
            if need_bias:
                grad_bias = rows.sum(0)
        else:
            if need_x or (need_w and not ctx.correlation):
                if w is None:  # convolution_backward wants a weight even for its gradient only
                    w = ctx.weight_fn()
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    grad, x, w, None, layer.stride, layer.padding, layer.dilation, False,
                    (0,) * (x.dim() - 2), layer.groups,
                    (need_x, need_w and not ctx.correlation, False))
            if need_w and ctx.correlation:
                grad_w = depthwise_conv.correlation_weight_grad(grad, x, layer.padding)
            if need_bias:
                grad_bias = grad.sum((0, *range(2, grad.dim())))
        # (the sources get theirs through the weight's graph; saved_tensors is not read twice:
        # every read rebuilds tensors that saved-tensor hooks recompute)
        return (None, None, None, grad_x, grad_w, grad_bias) + (None,) * (
            len(ctx.needs_input_grad) - 6)
