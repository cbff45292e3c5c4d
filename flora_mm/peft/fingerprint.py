"""Base-weight fingerprints computed where the weights live, shard by shard.

The adapter file records which base model it was trained on, and FLoRAHook checks that the
frozen weights did not change. Both used to copy every frozen tensor to the host and hash the
bytes: ~12 GB per rank per pass for InternViT-6B. Here each rank sums a position-weighted
checksum of its own shard on its device (``flora_mm.dist.partial_checksum``) and one all-reduce
combines them; the per-tensor sums are the same whether the model is sharded or whole, on any
number of ranks, so a file written by a sharded run checks against an unsharded model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..dist import checksums
from .base import AdapterLayer
from .io import base_state_names


def base_checksums(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: checksum} of every frozen base tensor (collective when sharded)."""
    state = model.state_dict()
    return checksums({name: state[name] for name in base_state_names(model)})


def fingerprint_from_checksums(model: nn.Module, sums: dict[str, tuple[int, int]]) -> str:
    """sha256 over names, shapes, dtypes and the per-tensor checksums (host, tiny)."""
    state = model.state_dict()
    digest = hashlib.sha256()
    for name in base_state_names(model):
        t = state[name]
        digest.update(f'{name}|{tuple(t.shape)}|{t.dtype}'.encode())
        if name in sums:
            digest.update(f'|{sums[name][0]}|{sums[name][1]}'.encode())
    return digest.hexdigest()


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the frozen base weights; merged adapter layers are read unmerged."""
    merged = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.merged]
    for layer in merged:
        layer.unmerge()
    try:
        return fingerprint_from_checksums(model, base_checksums(model))
    finally:
        for layer in merged:
            layer.merge()
