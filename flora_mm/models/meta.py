"""Build a model without memory: its parameters on the meta device, its schedules on the CPU.

Counting (``tools/count_params.py``, the budget solver) builds whole detectors and backbones
without allocating them. ``with torch.device('meta')`` puts *every* new tensor on the meta
device, and several OpenMMLab backbones read values back while they are built: mmdet's
``SwinTransformer`` and mmpretrain's ``ConvNeXt`` call ``.item()`` on a ``torch.linspace``
drop-path schedule in ``__init__``, which fails on the meta device ("Tensor.item() cannot be
called on meta tensors"). :func:`meta_device` is that context with one exception: the ranges
(``torch.arange``, ``torch.linspace``, ``torch.logspace``, ``torch.range``) stay on the CPU, where
schedules and relative-position indices read back as usual; they are 1-D and as long as a
schedule or an index, never a weight. A parameter built from them anyway (a sin-cos position
embedding) is moved to the meta device when its module registers it, so no parameter of the
built model holds memory (buffers made from ranges stay on the CPU: indices, a few KB).

Initialisers do nothing on the meta device but still cost their dispatch: timm's
``trunc_normal_`` (uniform, erfinv, mul, add, clamp, each through torch's Python reference
kernels for meta) was half the build time of ConvNeXt-V2-L and InternViT-6B. In-place ops that
only write values (:data:`_VALUE_ONLY_INPLACE`) return their meta tensor untouched; ops that
change a tensor's shape, layout or flags (``resize_``, ``requires_grad_``...) still run.

Why it is hand-written: torch offers the device context (all or nothing) and
``torch.set_default_device`` (the same); accelerate's ``init_empty_weights`` patches
``nn.Module.register_parameter`` but builds everything else on the CPU, and is no dependency
here. A ``TorchFunctionMode`` that chooses the device per factory function is a few lines.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

#: factory functions that take ``device=`` (torch's own list for its device context, less
#: the sparse and nested constructors, which no backbone builds)
_FACTORIES = frozenset({
    torch.empty, torch.empty_strided, torch.empty_permuted, torch.zeros, torch.ones,
    torch.full, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor, torch.tril_indices,
    torch.triu_indices, torch.bartlett_window, torch.blackman_window, torch.hamming_window,
    torch.hann_window, torch.kaiser_window, torch.fft.fftfreq, torch.fft.rfftfreq,
    torch.arange, torch.linspace, torch.logspace, torch.range})
#: the ones that stay on the CPU: schedules and indices, read back with ``.item()``/``tolist()``
_RANGES = frozenset({torch.arange, torch.linspace, torch.logspace, torch.range})

#: in-place ops that change values only (initialisers and their arithmetic): on a meta tensor
#: there are no values, so they return it as it is
_VALUE_ONLY_INPLACE = frozenset(
    getattr(torch.Tensor, name) for name in (
        'uniform_', 'normal_', 'erfinv_', 'mul_', 'add_', 'sub_', 'div_', 'clamp_', 'clamp_min_',
        'clamp_max_', 'fill_', 'zero_', 'copy_', 'exponential_', 'bernoulli_', 'random_',
        'log_normal_', 'cauchy_', 'geometric_', 'sqrt_', 'exp_', 'log_', 'neg_', 'abs_',
        'fill_diagonal_', 'masked_fill_', 'addcmul_', 'addcdiv_', 'lerp_', 'pow_'))

META = torch.device('meta')


class _MetaExceptRanges(TorchFunctionMode):
    """New tensors without an explicit device go to the meta device, ranges to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_ONLY_INPLACE and args and getattr(args[0], 'is_meta', False):
            return args[0]
        if func in _FACTORIES and kwargs.get('device') is None:
            kwargs = dict(kwargs, device='cpu' if func in _RANGES else META)
        return func(*args, **kwargs)


def _parameter_to_meta(module: nn.Module, name: str, param):
    if param is None or param.device == META:
        return None
    return nn.Parameter(param.detach().to(META), requires_grad=param.requires_grad)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``with meta_device(): model = MODELS.build(cfg)``: every parameter on the meta device
    (no memory), schedules and indices on the CPU (see the module docstring)."""
    handle = register_module_parameter_registration_hook(_parameter_to_meta)
    try:
        with _MetaExceptRanges():
            yield
    finally:
        handle.remove()


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """``with meta_parameters(): model = MODELS.build(cfg)``: every *parameter* goes to the
    meta device as its module registers it; everything else (buffers, schedules, indices, a
    data preprocessor's mean/std) is built on the CPU as usual.

    The sharded start (``FullyShardedModel(meta_init=True)``) builds with this rather than
    :func:`meta_device`: after ``to_empty`` every tensor is uninitialised memory, and
    non-persistent buffers (not in any state dict, so no checkpoint restores them) would stay
    garbage. Built on the CPU they can be copied back after ``to_empty``; they are small.
    A parameter exists on the CPU only between its creation and its registration (one tensor
    at a time, uninitialised ``torch.empty`` in torch's layers).
    """
    handle = register_module_parameter_registration_hook(_parameter_to_meta)
    try:
        yield
    finally:
        handle.remove()
