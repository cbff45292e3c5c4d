"""Kernel choices for ops whose default CPU kernel is far from the physical limit."""
from .depthwise_conv import depthwise_conv2d, uses_shifted_weight_grad

__all__ = ['depthwise_conv2d', 'uses_shifted_weight_grad']
