"""Kernel choices for ops whose default CPU kernel is far from the physical limit, and ops that
keep less for backward than their composed form."""
from .depthwise_conv import (conv2d_forward, correlation_weight_grad_serves, depthwise_conv2d,
                             uses_correlation_weight_grad)
from .factored_linear import cast_matmul, factored_linear
from .recomputed_weight import linear_or_conv_with_recomputed_weight, recomputed_weight_serves

__all__ = ['cast_matmul', 'conv2d_forward', 'correlation_weight_grad_serves', 'depthwise_conv2d',
           'factored_linear', 'linear_or_conv_with_recomputed_weight',
           'recomputed_weight_serves', 'uses_correlation_weight_grad']
