"""Frobenius norms of adapter updates without building the full-size update where a closed form
exists, on plain or FSDP-sharded (DTensor) adapters.

Each adapter layer says whether it has a closed form (``AdapterLayer.closed_form_sq_norm``:
FLoRA's from the Gram matrices of its factors, LoRA's from two r x r Gram matrices); the others
(DoRA: the column norm of W0 + BA needs W0) materialise ``delta_weight()``.

Sharded adapters are gathered first (``full_tensor``; a collective, so every rank must call):
they are small (rank x dim). Only the materialising fallback gathers the layer's base weight,
one layer at a time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from ..dist import full_tensor, is_sharded
from .base import AdapterLayer


@contextlib.contextmanager
def gathered_parameters(layer: torch.nn.Module,
                        only: Optional[Callable[[str], bool]] = None) -> Iterator[None]:
    """Temporarily replace the layer's sharded parameters (its submodules' too; those whose
    name ``only`` accepts, if given) by gathered plain tensors."""
    saved = []
    for prefix, module in layer.named_modules():
        for name, param in list(module._parameters.items()):
            full_name = f'{prefix}.{name}' if prefix else name
            if param is not None and is_sharded(param) and (only is None or only(full_name)):
                saved.append((module, name, param))
                module._parameters[name] = torch.nn.Parameter(full_tensor(param),
                                                              requires_grad=False)
    try:
        yield
    finally:
        for module, name, param in saved:
            module._parameters[name] = param


@torch.no_grad()
def update_sq_norm(layer: AdapterLayer) -> torch.Tensor:
    """Squared Frobenius norm of the layer's scaled update (fp32, 0-dim)."""
    with gathered_parameters(layer, lambda name: name.startswith(layer.adapter_prefixes)):
        closed = layer.closed_form_sq_norm()
        if closed is not None:
            return closed.float()
        with gathered_parameters(layer):  # the rest: the base weight (and bias)
            return layer.delta_weight().float().pow(2).sum()
