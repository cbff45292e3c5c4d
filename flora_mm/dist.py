"""Tensor helpers that work the same on plain tensors and on FSDP2's sharded DTensors.

FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces every parameter by a DTensor sharded on
dim 0 (``torch.chunk`` across the ranks). Code that reads parameters outside the forward pass
(adapter files, fingerprints, update norms) must then either gather the small tensors it needs
(``full_tensor``) or work on each rank's own shard and combine the results across ranks
(``local_rows``): a 6B frozen base is never copied whole to one device or to the host.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None  # type: ignore


def is_sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(tensors) -> bool:
    return any(is_sharded(t) for t in tensors)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank (a collective for a DTensor: call it on every rank)."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def gather_full(tensors: dict[str, torch.Tensor], to_cpu: bool = True,
                rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Complete copies of (possibly sharded) tensors; call on every rank.

    Gathered one tensor at a time; with ``rank0_only`` the other ranks drop each copy at once
    (and return {}), so at most one full tensor is alive there.
    """
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for name, t in tensors.items():
        full = full_tensor(t)
        if keep:
            out[name] = full.cpu() if to_cpu else full
    return out


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part, flat index of its first element in the whole tensor).

    A plain tensor is its own part at offset 0. A DTensor must be sharded on dim 0 of a 1-D mesh
    or replicated (what ``fully_shard`` produces); a replicated DTensor counts on rank 0 only,
    so that sums over ranks count every element once.
    """
    t = t.detach()
    if not is_sharded(t):
        return t, 0
    placements = t.placements
    if len(placements) != 1:
        raise NotImplementedError(f'DTensor on a {len(placements)}-D mesh: only 1-D meshes '
                                  f'(plain FSDP) are supported here, got {placements}')
    local = t.to_local()
    placement = placements[0]
    if isinstance(placement, Replicate):
        if t.device_mesh.get_local_rank() != 0:
            return local.new_empty((0,) + tuple(local.shape[1:])), 0
        return local, 0
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(f'DTensor placement {placement}: only Shard(0) and '
                                  'Replicate are supported (what fully_shard produces)')
    # torch.chunk semantics (FSDP2 and DTensor both use them): ceil-sized chunks in rank order
    rank = t.device_mesh.get_local_rank()
    rows = t.shape[0]
    world = t.device_mesh.size()
    chunk = -(-rows // world) if rows else 0
    first_row = min(rank * chunk, rows)
    row_numel = math.prod(t.shape[1:])  # elements of one row of the whole tensor
    return local, first_row * row_numel


def sum_over_ranks(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    """All-reduce (sum) ``values`` when the model is sharded; unchanged otherwise."""
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# --------------------------------------------------------------------------- checksums
# Each 32-bit word of a tensor (one per element for <= 4-byte dtypes) is multiplied by an odd
# weight derived from its global position, in int32 (wrapping mod 2**32), and the products are
# summed in int64, which cannot overflow below 2**32 words. So the result does not depend on
# how the tensor is split: the sum over the shards equals the sum over the whole tensor, on any
# number of ranks, on CPU or GPU. Any single changed word changes the sum: its difference is
# non-zero mod 2**32 and the weight is odd, hence invertible mod 2**32.
_MULTIPLIERS = (-1640531535, -2048144777)  # 2654435761 and 2246822519 as int32
_CHUNK = 1 << 24  # words per step: bounds the int32 temporaries (~ 4 x 64 MiB)


def _words(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor's bit patterns as int32 words, words per element)."""
    flat = t.contiguous().view(-1)
    size = flat.element_size()
    if size >= 4:
        return flat.view(torch.int32), size // 4
    if size == 2:
        return flat.view(torch.int16).to(torch.int32), 1
    return flat.view(torch.uint8).to(torch.int32), 1


@torch.no_grad()
def partial_checksum(local: torch.Tensor, offset: int) -> torch.Tensor:
    """int64[2] for this part of a tensor; ``offset``: flat index of its first element.

    A checksum, not a cryptographic hash: it detects accidental change (another base model, an
    update that leaked into frozen weights), computed on the tensor's own device.
    """
    out = torch.zeros(2, dtype=torch.int64, device=local.device)
    words, per = _words(local)
    first = offset * per
    for start in range(0, words.numel(), _CHUNK):
        part = words[start:start + _CHUNK]
        lo = first + start
        if lo + part.numel() < 2 ** 31:
            index = torch.arange(lo, lo + part.numel(), device=local.device,
                                 dtype=torch.int32)
        else:  # positions past 2**31: wrap them into int32 as the products do
            index = torch.arange(lo, lo + part.numel(), device=local.device,
                                 dtype=torch.int64).remainder(2 ** 32).to(torch.int32)
        for k, mult in enumerate(_MULTIPLIERS):
            weight = (index * mult + k) | 1
            out[k] += (part * weight).sum(dtype=torch.int64)
    return out


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Whole-tensor checksums of plain or sharded tensors, computed where they live.

    With DTensors every rank sums its own shard and one all-reduce combines them (call it on
    every rank); plain tensors beside them count once. Meta tensors are skipped.
    """
    names = [k for k, t in tensors.items() if t.device.type != 'meta']
    if not names:
        return {}
    sharded = any_sharded(tensors[k] for k in names)
    # plain tensors of a sharded model (FSDP2 leaves buffers such as batch-norm statistics
    # whole on every rank) are counted on rank 0 only, or the all-reduce would add them up
    rank = dist.get_rank() if sharded and dist.is_available() and dist.is_initialized() else 0
    parts = []
    for name in names:
        local, offset = local_rows(tensors[name])
        part = partial_checksum(local, offset)
        parts.append(part if rank == 0 or is_sharded(tensors[name]) else torch.zeros_like(part))
    device = parts[0].device
    stacked = torch.stack([p.to(device) for p in parts])
    stacked = sum_over_ranks(stacked, sharded).cpu()
    return {name: (int(a), int(b)) for name, (a, b) in zip(names, stacked.tolist())}
