"""Kernel choices for ops whose default CPU kernel is far from the physical limit."""
from .depthwise_conv import conv2d_forward, depthwise_conv2d, uses_correlation_weight_grad
from .factored_linear import factored_linear

__all__ = ['conv2d_forward', 'depthwise_conv2d', 'factored_linear', 'uses_correlation_weight_grad']
