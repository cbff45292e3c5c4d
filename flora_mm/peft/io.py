"""Adapter-only checkpoints: a safetensors file of what fine-tuning changed plus a JSON sidecar.

What changed = the PEFT method's tensors inside every injected module, plus every parameter and
buffer OUTSIDE injected modules (necks and heads train from scratch, so a fresh model needs them
too). The frozen base weights are not stored; the JSON records the method configs and a
fingerprint of the base weights, checked when the file is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..dist import any_sharded, checksums, gather_full
from ..utils import atomic_paths
from .api import adapter_state_dict, injected_roots, load_adapter_state_dict, unmerged

FORMAT = 'flora_mm.adapter/1'


def _root_prefixes(model: nn.Module) -> list[str]:
    return [f'{name}.' if name else '' for name, _, _ in injected_roots(model)]


def base_state_names(model: nn.Module) -> list[str]:
    """Names of the frozen base tensors (inside injected modules, not the method's own)."""
    trainable = set(adapter_state_dict(model))
    prefixes = _root_prefixes(model)
    return [k for k in model.state_dict()
            if any(k.startswith(p) for p in prefixes) and k not in trainable]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's tensors plus everything outside injected modules."""
    prefixes = _root_prefixes(model)
    if not prefixes:
        raise ValueError('the model has no injected PEFT method (use PEFTBackbone or FLoRAHook)')
    out = dict(adapter_state_dict(model))
    if '' not in prefixes:  # the whole model is injected: nothing lies outside
        out.update({k: v for k, v in model.state_dict().items()
                    if not any(k.startswith(p) for p in prefixes)})
    return {k: v.detach() for k, v in out.items()}


def base_checksums(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: checksum} of every frozen base tensor (meta tensors left out).

    Computed where each tensor lives (GPU, CPU, or this rank's FSDP shard, combined over the
    ranks by one all-reduce: call on every rank); the value does not depend on the device or on
    the sharding (``flora_mm.dist.partial_checksum``). No host copy of the weights.
    """
    state = model.state_dict()
    return checksums({name: state[name] for name in base_state_names(model)})


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base tensors' names, shapes, dtypes and checksums.

    Tensors in merged adapter layers are read unmerged. A file written by a sharded run checks
    against an unsharded model and the other way round.
    """
    with unmerged(model):
        sums = base_checksums(model)
        digest = hashlib.sha256()
        state = model.state_dict()
        for name in base_state_names(model):
            t = state[name]
            digest.update(f'{name}|{tuple(t.shape)}|{t.dtype}'.encode())
            if name in sums:
                digest.update(f'|{sums[name][0]}|{sums[name][1]}'.encode())
        return digest.hexdigest()


def base_digests(model: nn.Module) -> dict[str, str]:
    """One digest per frozen base tensor (meta tensors left out): shows WHICH ones changed."""
    return {name: f'{a & (2 ** 64 - 1):016x}{b & (2 ** 64 - 1):016x}'
            for name, (a, b) in base_checksums(model).items()}


def gathered_trainable_state_dict(model: nn.Module,
                                  rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """``trainable_state_dict`` at full shape on the CPU. FSDP-sharded tensors are gathered one
    at a time (call on every rank; with ``rank0_only`` the other ranks get {}): an adapter file
    of a sharded run must not hold rank 0's shards only (the peft + ZeRO-3 "empty adapter"
    trap)."""
    tensors = trainable_state_dict(model)
    if not any_sharded(tensors.values()):
        return {k: v.contiguous().cpu().clone() for k, v in tensors.items()}
    return {k: v.contiguous() for k, v in gather_full(tensors, rank0_only=rank0_only).items()}


def save_adapter_checkpoint(model: nn.Module, path: str, meta: dict[str, Any] | None = None,
                            fingerprint: str | None = None,
                            tensors: dict[str, torch.Tensor] | None = None) -> tuple[str, str]:
    """Write ``path`` (.safetensors) and ``path`` with .json; returns both paths.

    ``tensors``: the trained tensors already gathered (``gathered_trainable_state_dict``; a
    sharded run gathers on every rank and writes on rank 0).

    Both files are written to temporary names first and renamed together, so a crash leaves
    no half-written file.
    """
    if not path.endswith('.safetensors'):
        raise ValueError(f'adapter checkpoint path must end with .safetensors: {path}')
    if tensors is None:
        tensors = gathered_trainable_state_dict(model)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'refusing to write {path}: {len(bad)} tensors hold NaN/Inf '
                         f'(e.g. {bad[:5]})')
    info = dict(
        format=FORMAT,
        methods={name: method.to_dict() for name, _, method in injected_roots(model)},
        base_fingerprint=fingerprint if fingerprint is not None else base_fingerprint(model),
        num_tensors=len(tensors),
        num_elements=int(sum(t.numel() for t in tensors.values())),
        meta=meta or {},
    )
    json_path = path[:-len('.safetensors')] + '.json'
    with atomic_paths(path, json_path) as (tmp, tmp_json):
        save_file(tensors, tmp, metadata={'format': FORMAT})
        with open(tmp_json, 'w') as f:
            f.write(json.dumps(info, indent=2, default=str))
    return path, json_path


def read_adapter_info(path: str) -> dict:
    json_path = path[:-len('.safetensors')] + '.json'
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f'adapter checkpoint {path} has no sidecar {json_path}')
    try:
        with open(json_path) as f:
            info = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f'{json_path}: not valid JSON (truncated?): {err}') from None
    if info.get('format') != FORMAT:
        raise ValueError(f'{json_path}: not a flora_mm adapter checkpoint ({info.get("format")})')
    return info


def load_adapter_checkpoint(model: nn.Module, path: str, strict: bool = True,
                            check_fingerprint: bool = True) -> dict:
    """Load an adapter checkpoint into a model that has the same PEFT method injected.

    With ``check_fingerprint`` a different base model (other pretrained weights) is an error.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no adapter checkpoint at {path}')
    info = read_adapter_info(path)
    here = json.loads(json.dumps(
        {name: method.to_dict() for name, _, method in injected_roots(model)}, default=str))
    if here != info['methods']:
        from ..engine.checkpoint import describe_changes
        raise ValueError(f'{path} was written for other PEFT methods than the model has; '
                         f'changed: {"; ".join(describe_changes(info["methods"], here)[:10])}')
    if check_fingerprint and base_fingerprint(model) != info['base_fingerprint']:
        raise ValueError(f'{path} was trained on another base model (fingerprint mismatch); '
                         'load the same pretrained weights first or pass check_fingerprint=False')
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f'cannot read adapter checkpoint {path} (truncated or corrupt?): '
                         f'{err}') from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f'{path} holds non-finite values (NaN/Inf) in {len(bad)} tensors '
                         f'(e.g. {bad[:5]}): the run that wrote it diverged')
    expected = trainable_state_dict(model)
    if strict:
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            raise KeyError(
                f'{path} does not fit the model: {len(missing)} missing tensors '
                f'{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (written for '
                'another head / neck / model size, or from one shard or rank only?)')
    mismatched = [f'{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model'
                  for k, v in tensors.items() if k in expected
                  and tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        raise ValueError(f'{path} does not fit the model: {len(mismatched)} tensors with '
                         f'another shape {mismatched[:3]} (other rank or model size?)')
    adapters = set(adapter_state_dict(model))
    load_adapter_state_dict(model, {k: v for k, v in tensors.items() if k in adapters},
                            strict=strict)
    rest = {k: v for k, v in tensors.items() if k not in adapters and k in expected}
    model.load_state_dict(rest, strict=False)
    return info

