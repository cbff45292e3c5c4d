"""A linear or conv layer run with a weight built from other tensors (W0 + dW), whose backward
rebuilds that weight instead of keeping it.

An adapter that materialises its update runs the base op with ``W0 + dW``. Composed from
autograd's ops, the op keeps that weight alive from forward to backward for the input
gradient: one full-size weight per adapted layer and step, which the frozen backbone does not
pay (its op keeps W0, a parameter). On ConvNeXt-V2-L at batch 2 those are 9.6 MiB of the
adapters' 21 MiB of extra activation memory (docs/performance.md). Rebuilding the weight in
backward costs the small factor products again and one weight-sized addition.

Written by hand because torch's activation checkpointing recomputes a region's saved tensors
through saved-tensor hooks, which do not compose with the hooks the lean ConvNeXt blocks
already put around these layers (``peft.recompute``), and would recompute the base op too. The
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

_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def recomputed_weight_serves(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear_or_conv_with_recomputed_weight`` can run ``layer`` on ``x``: a plain
    nn.Linear, or an nn.ConvNd with zero padding given as numbers, on a batched input."""
    if type(layer) is nn.Linear:
        return x.dim() >= 1
    dims = _CONV_DIMS.get(type(layer))
    return (dims is not None and x.dim() == dims + 2 and layer.padding_mode == 'zeros'
            and isinstance(layer.padding, tuple))


def linear_or_conv_with_recomputed_weight(layer: nn.Module, x: torch.Tensor,
                                          weight_fn: Callable[[], torch.Tensor],
                                          bias: torch.Tensor | None,
                                          sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """``layer``'s op (linear, or conv with its stride, padding, dilation and groups) on ``x``
    with ``weight_fn()`` as the weight, differentiable in ``x``, ``bias`` and ``sources``: the
    tensors ``weight_fn`` builds the weight from. ``weight_fn`` is called again in backward and
    must give the same weight (the sources' version counters check that nothing changed them
    in place in between).

    ``sources`` must be the very tensor objects ``weight_fn`` reads (leaves, e.g. parameters):
    backward differentiates the rebuilt weight with respect to them.
    """
    if not recomputed_weight_serves(layer, x):
        raise ValueError(f'linear_or_conv_with_recomputed_weight: cannot run a '
                         f'{type(layer).__name__} on a {x.dim()}-D input this way')
    correlation = (isinstance(layer, nn.Conv2d)
                   and depthwise_conv.correlation_weight_grad_serves(layer, x))
    return _RecomputedWeightOp.apply(layer, weight_fn, correlation, x, bias, *sources)


class _RecomputedWeightOp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, layer: nn.Module, weight_fn: Callable[[], torch.Tensor], correlation: bool,
                x: torch.Tensor, bias: torch.Tensor | None, *sources: torch.Tensor
                ) -> torch.Tensor:
        weight = weight_fn()  # autograd is off in here: nothing of it is kept
        if type(layer) is nn.Linear:
            out = F.linear(x, weight, bias)
        else:
            out = _CONV_FNS[_CONV_DIMS[type(layer)]](x, weight, bias, layer.stride,
                                                     layer.padding, layer.dilation, layer.groups)
        ctx.layer, ctx.weight_fn, ctx.correlation = layer, weight_fn, correlation
        # the sources themselves: saved for their version check, read back through weight_fn
        ctx.sources = sources
        ctx.save_for_backward(x, *sources)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, *_ = ctx.saved_tensors  # also raises if a source was modified in place
        layer = ctx.layer
        need_x, need_bias = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        trainable = [(i, s) for i, s in enumerate(ctx.sources) if ctx.needs_input_grad[5 + i]]
        with torch.enable_grad():
            weight = ctx.weight_fn()
        w = weight.detach()
        grad_x = grad_w = grad_bias = None
        if type(layer) is nn.Linear:
            rows = grad.reshape(-1, grad.shape[-1])
            if need_x:
                grad_x = (rows @ w).view(x.shape)
            if trainable:
                grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
            if need_bias:
                grad_bias = rows.sum(0)
        else:
            dims = _CONV_DIMS[type(layer)]
            need_w = bool(trainable) and not ctx.correlation
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, w, None, layer.stride, layer.padding, layer.dilation, False,
                (0,) * dims, layer.groups, (need_x, need_w, False))
            if trainable and ctx.correlation:
                grad_w = depthwise_conv.correlation_weight_grad(grad, x, layer.padding)
            if need_bias:
                grad_bias = grad.sum((0, *range(2, grad.dim())))
        grads_sources = [None] * len(ctx.sources)
        if trainable:
            found = torch.autograd.grad(weight, [s for _, s in trainable], grad_w,
                                        allow_unused=True)
            for (i, _), g in zip(trainable, found):
                grads_sources[i] = g  # None where the weight does not depend on that source
        return (None, None, None, grad_x, grad_bias, *grads_sources)
