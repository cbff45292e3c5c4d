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
# Two odd multipliers below 2**31: each element's bit pattern (< 2**32) times a position weight
# (< 2**31) fits in int64, and the sum wraps modulo 2**64. Modular addition is associative and
# commutative, so the sum over shards equals the sum over the whole tensor on any number of
# ranks, on CPU or GPU: the same base gives the same checksum sharded or not.
_MULTIPLIERS = (2654435761, 2246822519)
_MODULUS = 2 ** 31 - 1
_CHUNK = 1 << 24  # elements per step: bounds the int64 temporaries (~ 3 x 128 MiB)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as non-negative int64 (one element per original element)."""
    t = t.contiguous().view(-1)
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    size = t.element_size()
    if size == 8:  # float64 / int64: fold the two 32-bit halves
        halves = t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        halves = halves.view(-1, 2)
        return halves[:, 0] ^ (halves[:, 1] * 3)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[size]
    mask = (1 << (8 * size)) - 1
    return t.view(as_int).to(torch.int64) & mask


@torch.no_grad()
def partial_checksum(local: torch.Tensor, offset: int) -> torch.Tensor:
    """int64[2]: sum over this part's elements of bits(x_i) * w_k(i), i the global flat index.

    Any single changed element changes both sums (bits delta < 2**32, weight odd and < 2**31, so
    the product is a non-zero number below 2**63). A checksum, not a cryptographic hash: it
    detects accidental change (a different base, an update that leaked into frozen weights).
    """
    out = torch.zeros(2, dtype=torch.int64, device=local.device)
    flat = local.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        bits = _bits(flat[start:start + _CHUNK])
        index = torch.arange(offset + start, offset + start + bits.numel(),
                             device=local.device, dtype=torch.int64)
        for k, mult in enumerate(_MULTIPLIERS):
            weight = ((index * mult + k + 1) % _MODULUS) | 1
            out[k] += (bits * weight).sum()
    return out


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Whole-tensor checksums of plain or sharded tensors, computed where they live.

    With DTensors every rank sums its own shard and one all-reduce combines them (call it on
    every rank). Meta tensors are skipped.
    """
    names = [k for k, t in tensors.items() if t.device.type != 'meta']
    if not names:
        return {}
    sharded = any_sharded(tensors[k] for k in names)
    parts = []
    for name in names:
        local, offset = local_rows(tensors[name])
        parts.append(partial_checksum(local, offset))
    device = parts[0].device
    stacked = torch.stack([p.to(device) for p in parts])
    stacked = sum_over_ranks(stacked, sharded).cpu()
    return {name: (int(a), int(b)) for name, (a, b) in zip(names, stacked.tolist())}
