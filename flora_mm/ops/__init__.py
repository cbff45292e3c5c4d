"""Kernel choices for ops whose default CPU kernel is far from the physical limit, and ops that
keep less for backward than their composed form."""
from .depthwise_conv import (conv2d_forward, correlation_weight_grad_serves, depthwise_conv2d,
                             uses_correlation_weight_grad)
from .cast_product import cast_conv, cast_matmul
from .factored_linear import factored_linear
from .recomputed_weight import linear_or_conv_with_recomputed_weight, recomputed_weight_serves

__all__ = ['cast_conv', 'cast_matmul', 'conv2d_forward', 'correlation_weight_grad_serves',
           'depthwise_conv2d', 'factored_linear', 'linear_or_conv_with_recomputed_weight',
           'recomputed_weight_serves', 'uses_correlation_weight_grad']
