"""Depthwise 2-D convolution whose CPU weight gradient is computed as a correlation.

oneDNN's CPU weight gradient of a depthwise conv is far slower than that conv's input gradient,
which has the same number of multiply-adds (docs/performance.md, "Figures behind the design
choices"). The weight gradient is what it is: for each channel, the input map correlated with
the output-gradient map, summed over the batch. With batch and channels in one dimension that
is a single depthwise conv *forward* over batch x channels maps whose kernels are the gradient
maps (out: kernel-sized), and oneDNN runs that forward fast. The input gradient and the
forward stay oneDNN's. Written by hand because torch offers no other depthwise weight
gradient on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def uses_correlation_weight_grad(conv: nn.Conv2d, x: torch.Tensor,
                                  weight: torch.Tensor) -> bool:
    """Whether ``depthwise_conv2d`` serves ``conv`` run on ``x`` with ``weight`` (its own or
    an adapted one): ``correlation_weight_grad_serves`` and a weight that needs its gradient."""
    return (weight.requires_grad and torch.is_grad_enabled() and weight.dtype == torch.float32
            and correlation_weight_grad_serves(conv, x))


def correlation_weight_grad_serves(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``correlation_weight_grad`` gives ``conv``'s weight gradient on ``x``: a plain
    zero-padded, stride-1, undilated depthwise conv, fp32 on the CPU outside autocast."""
    if (type(conv) is not nn.Conv2d or x.device.type != 'cpu' or x.dim() != 4
            or x.dtype != torch.float32 or torch.is_autocast_enabled('cpu')):
        return False
    channels = conv.in_channels
    return (conv.groups == channels == conv.out_channels and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros'
            and isinstance(conv.padding, tuple) and x.numel() > 0)


def conv2d_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s own computation with ``weight`` and ``bias``, through ``depthwise_conv2d``
    where that serves it (``uses_correlation_weight_grad``), else through
    ``conv._conv_forward``."""
    if uses_correlation_weight_grad(conv, x, weight):
        return depthwise_conv2d(x, weight, bias, conv.padding)
    return conv._conv_forward(x, weight, bias)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, 1, groups=channels)``; backward computes the
    weight gradient as a correlation (see the module docstring)."""
    return _DepthwiseConv2d.apply(x, weight, bias, tuple(padding))


def correlation_weight_grad(grad: torch.Tensor, x: torch.Tensor,
                            padding: tuple[int, int]) -> torch.Tensor:
    """sum_n corr(x[n, c], grad[n, c]) for every channel c: one depthwise conv forward over the
    n x c input maps (batch and channels in one dimension, NCHW memory: a copy when ``x`` is
    channels-last), whose kernels are the gradient maps; the output is kernel-sized."""
    batch, channels, height, width = x.shape
    maps = x.contiguous().view(1, batch * channels, height, width)
    kernels = grad.contiguous().view(batch * channels, 1, *grad.shape[-2:])
    corr = F.conv2d(maps, kernels, None, 1, padding, 1, batch * channels)
    return corr.view(batch, channels, *corr.shape[-2:]).sum(0).unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, 1, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, (1, 1), ctx.padding, (1, 1), False, (0, 0),
                x.shape[1], (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_weight = correlation_weight_grad(grad, x, ctx.padding)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None
