"""Reading an injected model whose parameters may be FSDP2 shards (DTensors).

Base-weight fingerprints, computed where the weights live, shard by shard. The adapter file
records which base model it was trained on, and FLoRAHook checks that the frozen weights did
not change. Both used to copy every frozen tensor to the host and hash the
bytes: ~12 GB per rank per pass for InternViT-6B. Here each rank sums a position-weighted
checksum of its own shard on its device (``flora_mm.dist.partial_checksum``) and one all-reduce
combines them; the per-tensor sums are the same whether the model is sharded or whole, on any
number of ranks, so a file written by a sharded run checks against an unsharded model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..dist import any_sharded, checksums, gather_full
from .base import AdapterLayer
from .io import base_state_names, trainable_state_dict


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


def gathered_trainable_state_dict(model: nn.Module,
                                  rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The adapter file's tensors at full shape on the CPU (the method's tensors and everything
    outside injected modules). Sharded tensors are gathered one at a time (call on every rank);
    with ``rank0_only`` the other ranks return {}. This is what keeps an adapter file of a
    sharded run from holding rank 0's shards only (the peft + ZeRO-3 "empty adapter" trap)."""
    tensors = trainable_state_dict(model)
    if not any_sharded(tensors.values()):
        return {k: v.contiguous().cpu().clone() for k, v in tensors.items()}
    return {k: v.contiguous() for k, v in gather_full(tensors, rank0_only=rank0_only).items()}
