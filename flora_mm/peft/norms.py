"""Frobenius norms of adapter updates without building the full-size update where a closed form
exists, on plain or FSDP-sharded (DTensor) adapters.

FLoRA: ``||s G x_1 U_1 ... x_N U_N||_F^2 = s^2 <G, G x_1 M_1 ... x_N M_N>`` with the Gram
matrices ``M_n = U_n^T U_n`` (J_n x J_n): only core-sized tensors are formed.
LoRA: ``||s B A||_F^2 = s^2 sum((B^T B) * (A A^T))`` (two r x r Gram matrices).
Other methods (DoRA: the column norm of W0 + BA needs W0) materialise ``delta_weight()``.

Sharded adapters are gathered first (``full_tensor``; a collective, so every rank must call):
they are small (rank x dim). Only the materialising fallback gathers the layer's base weight,
one layer at a time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..dist import full_tensor, is_sharded
from .base import AdapterLayer
from .flora import FLoRALayer, _mode_product
from .lora import LoRALayer


def flora_sq_norm(core: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``||scale * G x_n U_n||_F^2`` from the core and the factors' Gram matrices."""
    core = core.float()
    t = core
    for mode, factor in enumerate(factors):
        factor = factor.float()
        t = _mode_product(t, factor.transpose(0, 1) @ factor, mode)
    return (scale ** 2) * (core * t).sum()


def lora_sq_norm(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||scaling * B A||_F^2`` from B^T B and A A^T (both r x r, symmetric)."""
    a, b = lora_a.float(), lora_b.float()
    return (scaling ** 2) * ((b.transpose(0, 1) @ b) * (a @ a.transpose(0, 1))).sum()


@contextlib.contextmanager
def gathered_parameters(layer: torch.nn.Module) -> Iterator[None]:
    """Temporarily replace the layer's own sharded parameters by gathered plain tensors."""
    saved = {}
    for name, param in list(layer._parameters.items()):
        if param is not None and is_sharded(param):
            saved[name] = param
            layer._parameters[name] = torch.nn.Parameter(full_tensor(param),
                                                         requires_grad=False)
    try:
        yield
    finally:
        layer._parameters.update(saved)


@torch.no_grad()
def update_sq_norm(layer: AdapterLayer) -> torch.Tensor:
    """Squared Frobenius norm of the layer's scaled update (fp32, 0-dim)."""
    if isinstance(layer, FLoRALayer):
        core = full_tensor(layer.flora_core)
        factors = [full_tensor(f) for f in layer.flora_factors]
        return flora_sq_norm(core, factors, layer.scale)
    if isinstance(layer, LoRALayer) and type(layer).delta_weight is LoRALayer.delta_weight:
        return lora_sq_norm(full_tensor(layer.lora_A), full_tensor(layer.lora_B), layer.scaling)
    with gathered_parameters(layer):
        return layer.delta_weight().float().pow(2).sum()
