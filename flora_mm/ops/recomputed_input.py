"""Keep an adapter's input out of autograd's saved tensors when it is cheap to recompute.

An exact adapter on a linear layer needs that layer's input in backward (the gradient of its
factors is ``x^T (...)``), while a frozen linear keeps nothing. In a ConvNeXt block the inputs
of ``fc1`` and ``fc2`` are a LayerNorm and a GRN output, cheap element-wise functions of tensors
the block keeps anyway (the LayerNorm's and the GRN's own inputs). Saving them costs ~1.5x the
frozen backbone's activation memory; recomputing them costs one element-wise pass each.

torch's ``saved_tensors_hooks`` is the mechanism autograd offers for this: the pack hook below
stores a recipe instead of every saved view of the input, the unpack hook rebuilds the tensor
when backward reaches it. Hand-written because torch's activation checkpointing recomputes a
whole region (here: the frozen GEMMs too) or, selectively, goes through a Python dispatch mode
on every op; measured on the CPU both cost far more than the one element-wise pass.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class RecomputeStats:
    """What the hooks did in one forward (tests and the benchmark read it)."""

    replaced: int = 0          # saved tensors that became recipes
    replaced_bytes: int = 0    # the bytes those would have kept alive
    kept: int = 0              # saved tensors passed through (weights, thin factors ...)
    recomputed: int = 0        # recipes rebuilt in backward
    #: weak references to the non-parameter tensors passed through (these hooks hide them
    #: from any outer saved_tensors_hooks, e.g. the benchmark's accounting)
    kept_tensors: list[weakref.ref] = field(default_factory=list)


@dataclass
class _Recipe:
    """A saved view of the recomputable tensor: its geometry relative to that tensor."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the source tensor's
    rebuild: Callable[[], torch.Tensor]


def run_with_recomputed_input(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                              recompute: Callable[[], torch.Tensor],
                              sources: tuple[torch.Tensor, ...] = (),
                              stats: RecomputeStats | None = None) -> torch.Tensor:
    """``fn(x)``, where autograd keeps no view of ``x`` but rebuilds it with ``recompute()``.

    ``recompute`` must return ``x`` again (same values, dtype and layout) from tensors that stay
    alive anyway (``sources``); it runs without grad, under the autocast state of this call.
    If a source is modified in place before backward the rebuilt tensor would be wrong: that is
    checked through the sources' version counters and raises.
    """
    if not torch.is_grad_enabled():
        return fn(x)
    # plain values only: autograd keeps the hooks as long as the graph, and a closure over
    # ``x`` itself would keep alive exactly the tensor this is here to free
    storage = x.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    base_offset = x.storage_offset()
    x_device = x.device
    device = x_device.type
    geometry = (tuple(x.shape), tuple(x.stride()), x.dtype)
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    guards = [(s, s._version) for s in sources]

    def rebuild() -> torch.Tensor:
        for src, version in guards:
            if src._version != version:
                raise RuntimeError(
                    'a tensor an adapter input is recomputed from was modified in place '
                    'between forward and backward; the recomputed input would be wrong')
        with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            fresh = recompute()
        # the saved views are re-cut from the rebuilt tensor by their strides and offsets
        if (tuple(fresh.shape), tuple(fresh.stride()), fresh.dtype) != geometry:
            raise RuntimeError(
                f'the recomputed adapter input has shape/stride/dtype '
                f'{(tuple(fresh.shape), tuple(fresh.stride()), fresh.dtype)}, forward had '
                f'{geometry}: recompute() must return the same tensor layout')
        return fresh

    def pack(t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or t.device != x_device
                or t.untyped_storage().data_ptr() != ptr):
            if stats is not None:
                stats.kept += 1
                if not isinstance(t, torch.nn.Parameter):
                    stats.kept_tensors.append(weakref.ref(t))
            return t
        if stats is not None:
            stats.replaced += 1
            stats.replaced_bytes += nbytes
        return _Recipe(tuple(t.size()), tuple(t.stride()), t.storage_offset() - base_offset,
                       rebuild)

    def unpack(packed):
        if not isinstance(packed, _Recipe):
            return packed
        if stats is not None:
            stats.recomputed += 1
        fresh = packed.rebuild()
        return fresh.as_strided(packed.size, packed.stride,
                                fresh.storage_offset() + packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(x)
