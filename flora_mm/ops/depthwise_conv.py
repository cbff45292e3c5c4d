"""Depthwise 2-D convolution whose weight gradient, on small CPU maps, is summed by shifts.

oneDNN's CPU weight gradient of a depthwise conv is pathological when the map has few
positions: at ConvNeXt-V2's last stage (8x768x7x7, 7x7 kernel) it takes 13 ms where that
conv's input gradient takes 0.3 ms, and 23 ms at 2x1536x7x7 (docs/performance.md). There the
weight gradient is cheaper as what it is: for each kernel tap (i, j), the product of the output
gradient with the input shifted by (i, j), summed over batch and positions (49 element-wise
passes over small tensors: 4.6 ms and 2.4 ms). On larger maps oneDNN wins and is kept; the
input gradient and the forward are always oneDNN's. Written by hand because no library
offers a depthwise weight gradient but the one that is slow here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: at most this many output positions (batch x height x width): measured crossover on the
#: project's CPU machine lies between 392 (shifts 3x faster) and 1568 (oneDNN 2.5x faster)
SHIFTED_WEIGHT_GRAD_MAX_POSITIONS = 512


def uses_shifted_weight_grad(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``depthwise_conv2d`` serves ``conv`` run on ``x`` with ``weight`` (its own or
    an adapted one): a plain zero-padded, stride-1, undilated depthwise conv, fp32 on the CPU
    outside autocast, with a weight that needs its gradient, on a small output map."""
    if (type(conv) is not nn.Conv2d or x.device.type != 'cpu' or x.dim() != 4
            or not weight.requires_grad or not torch.is_grad_enabled()
            or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled('cpu')):
        return False
    channels = conv.in_channels
    if not (conv.groups == channels == conv.out_channels and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros'
            and isinstance(conv.padding, tuple)):
        return False
    kh, kw = conv.kernel_size
    (ph, pw), (h, w) = conv.padding, x.shape[-2:]
    positions = x.shape[0] * (h + 2 * ph - kh + 1) * (w + 2 * pw - kw + 1)
    return 0 < positions <= SHIFTED_WEIGHT_GRAD_MAX_POSITIONS


def conv2d_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s own computation with ``weight`` and ``bias``, through ``depthwise_conv2d``
    where that serves it (``uses_shifted_weight_grad``), else through ``conv._conv_forward``."""
    if uses_shifted_weight_grad(conv, x, weight):
        return depthwise_conv2d(x, weight, bias, conv.padding)
    return conv._conv_forward(x, weight, bias)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, 1, groups=channels)``; backward computes the
    weight gradient by shifted products (see the module docstring)."""
    return _DepthwiseConv2d.apply(x, weight, bias, tuple(padding))


def _shifted_weight_grad(grad: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int],
                         padding: tuple[int, int]) -> torch.Tensor:
    kh, kw = kernel
    ph, pw = padding
    out_h, out_w = grad.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    weight_grad = grad.new_empty(grad.shape[1], 1, kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + out_h, j:j + out_w]
            weight_grad[:, 0, i, j] = (grad * window).sum((0, 2, 3))
    return weight_grad


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
            grad_weight = _shifted_weight_grad(grad, x, tuple(weight.shape[-2:]), ctx.padding)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None
