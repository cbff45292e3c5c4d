"""Checkpoints of PEFT models: adapter-only files, and whether a full checkpoint fits.

Adapter-only files: a safetensors file of what fine-tuning changed plus a JSON sidecar. What
changed = the PEFT method's tensors inside every injected module, plus every parameter and
buffer OUTSIDE injected modules (necks and heads train from scratch, so a fresh model needs them
too). The frozen base weights are not stored; the JSON records the method configs and a
fingerprint of the base weights, checked when the file is loaded. Both files are untrusted
input: the sidecar's shape and every tensor's type are checked before anything is loaded.

The generic checks (keys, shapes, types, finite values) are ``flora_mm.checkpoint.fit``'s; what
this module adds is which tensors a PEFT model needs from a file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import (CKPT_KEY, CheckpointError, check_finite, check_keys, check_types,
                          describe_changes, state_dict_of)
from ..dist import any_sharded, checksums, gather_full
from ..utils import atomic_paths
from ..utils.fileio import name_the_files, temporary_beside
from .api import (adapter_state_dict, injected_methods, injected_roots, load_adapter_state_dict,
                  unmerged)

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
                            tensors: dict[str, torch.Tensor] | None = None,
                            stage: bool = False) -> tuple[str, str]:
    """Write ``path`` (.safetensors) and ``path`` with .json; returns both paths.

    ``tensors``: the trained tensors already gathered (``gathered_trainable_state_dict``; a
    sharded run gathers on every rank and writes on rank 0).

    Both files are written to temporary names first and renamed together, so a crash leaves
    no half-written file. With ``stage`` they are left under their temporary names (in the
    same folder), which are returned: the caller renames them when what they belong to is
    written (``flora_mm.checkpoint.add_companions``).
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
        methods=injected_methods(model),
        base_fingerprint=fingerprint if fingerprint is not None else base_fingerprint(model),
        num_tensors=len(tensors),
        num_elements=int(sum(t.numel() for t in tensors.values())),
        meta=meta or {},
    )
    json_path = path[:-len('.safetensors')] + '.json'

    def write(tensor_file: str, json_file: str) -> None:
        save_file(tensors, tensor_file, metadata={'format': FORMAT})
        with open(json_file, 'w') as f:
            f.write(json.dumps(info, indent=2, default=str))

    if not stage:
        with atomic_paths(path, json_path) as (tmp, tmp_json):
            write(tmp, tmp_json)
        return path, json_path
    staged = (temporary_beside(path), temporary_beside(json_path))
    try:
        write(*staged)
    except BaseException as err:
        for tmp in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(err, OSError):
            raise name_the_files(err, path, json_path) from err
        raise
    return staged


#: the sidecar's fields and the JSON types each must have
_INFO_FIELDS = {'format': str, 'methods': dict, 'base_fingerprint': str, 'num_tensors': int,
                'num_elements': int, 'meta': dict}


def read_adapter_info(path: str) -> dict:
    """The JSON sidecar of ``path``, checked field by field (an error names the field)."""
    json_path = path[:-len('.safetensors')] + '.json'
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f'adapter checkpoint {path} has no sidecar {json_path}')
    try:
        with open(json_path) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{json_path}: not valid JSON (truncated?): {err}') from None
    if not isinstance(info, dict):
        raise ValueError(f'{json_path}: expected a JSON object with the fields '
                         f'{sorted(_INFO_FIELDS)}, got a {type(info).__name__}')
    if info.get('format') != FORMAT:
        raise ValueError(f'{json_path}: not a flora_mm adapter checkpoint ({info.get("format")})')
    for key, kind in _INFO_FIELDS.items():
        value = info.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f'{json_path}: field {key!r} must be a JSON '
                             f'{"string" if kind is str else kind.__name__}, got {value!r:.80}')
    if not all(isinstance(v, dict) for v in info['methods'].values()):
        raise ValueError(f'{json_path}: field \'methods\' must map each adapted module to its '
                         'method config (an object)')
    return info


def load_adapter_checkpoint(model: nn.Module, path: str, strict: bool = True,
                            check_fingerprint: bool = True) -> dict:
    """Load an adapter checkpoint into a model that has the same PEFT method injected.

    With ``check_fingerprint`` a different base model (other pretrained weights) is an error.
    Every tensor must keep its meaning in the model (no integer data in a float tensor), be
    finite and have the model's shape.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no adapter checkpoint at {path}')
    info = read_adapter_info(path)
    here = injected_methods(model)
    if here != info['methods']:
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
    expected = trainable_state_dict(model)
    if strict:
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            raise KeyError(
                f'{path} does not fit the model: {len(missing)} missing tensors '
                f'{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (written for '
                'another head / neck / model size, or from one shard or rank only?)')
    try:
        check_types(expected, tensors, path)
        check_finite(tensors, path)
        check_keys(expected, tensors, path, expected=[k for k in tensors if k in expected],
                   cause='another rank or model size')
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    adapters = set(adapter_state_dict(model))
    load_adapter_state_dict(model, {k: v for k, v in tensors.items() if k in adapters},
                            strict=strict)
    rest = {k: v for k, v in tensors.items() if k not in adapters and k in expected}
    model.load_state_dict(rest, strict=False)
    return info


def check_checkpoint_fits(model: nn.Module, checkpoint: Any, path: str,
                          complete: bool) -> None:
    """Raise CheckpointError unless a full checkpoint fits the PEFT ``model``.

    ``complete`` (resume, test): every tensor of the model must be in the file, with its
    shape, type and finite values, and a checkpoint that records its PEFT methods must record
    the model's. Otherwise (``load_from`` to start a fine-tuning): the method's tensors must
    be all present or all absent (a plain checkpoint), and those present must fit.
    """
    state = state_dict_of(checkpoint, path)
    info = checkpoint.get(CKPT_KEY) if isinstance(checkpoint, dict) else None
    here = injected_methods(model)
    if (complete and isinstance(info, dict) and info.get('methods') is not None
            and info['methods'] != here):
        changes = describe_changes(info['methods'], here)
        raise CheckpointError(f'{path} was written with other PEFT settings; changed: '
                              f'{"; ".join(changes[:10])}')
    own = model.state_dict()
    method_keys = [k for k in adapter_state_dict(model) if k in own]
    if complete:
        needed = list(own)
    else:
        needed = method_keys if any(k in state for k in method_keys) else []
    missing = [k for k in needed if k not in state]
    absent_method = [k for k in missing if k in set(method_keys)]
    cause = ('another PEFT method or rank, another model size or head, a merged checkpoint, '
             'or a file saved from one shard/rank only')
    if not missing:
        cause = 'another rank or model size'
    elif absent_method and len(absent_method) == len(method_keys):
        cause = ('the file has no tensors of the PEFT method: a plain or merged checkpoint '
                 '(test a merged file with the config merge_adapters wrote beside it)')
    check_keys(own, state, path, expected=needed, cause=cause)
    if complete:
        check_types(own, state, path)
        check_finite({k: state[k] for k in own if k in state}, path)
