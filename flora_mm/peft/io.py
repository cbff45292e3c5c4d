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

from ..utils import atomic_paths, tensor_bytes
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


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base tensors' names, shapes, dtypes and bytes.

    Computed on the CPU copy of each tensor; tensors in merged adapter layers are read unmerged.
    """
    with unmerged(model):
        digest = hashlib.sha256()
        state = model.state_dict()
        for name in base_state_names(model):
            t = state[name]
            digest.update(f'{name}|{tuple(t.shape)}|{t.dtype}'.encode())
            if t.device.type != 'meta':
                digest.update(tensor_bytes(t))
        return digest.hexdigest()


def base_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of each frozen base tensor (meta tensors left out): shows WHICH ones changed."""
    state = model.state_dict()
    return {name: hashlib.sha256(tensor_bytes(state[name])).hexdigest()
            for name in base_state_names(model) if state[name].device.type != 'meta'}


def save_adapter_checkpoint(model: nn.Module, path: str, meta: dict[str, Any] | None = None,
                            fingerprint: str | None = None) -> tuple[str, str]:
    """Write ``path`` (.safetensors) and ``path`` with .json; returns both paths.

    Both files are written to temporary names first and renamed together, so a crash leaves
    no half-written file.
    """
    if not path.endswith('.safetensors'):
        raise ValueError(f'adapter checkpoint path must end with .safetensors: {path}')
    tensors = {k: v.contiguous().cpu().clone() for k, v in trainable_state_dict(model).items()}
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
    with open(json_path) as f:
        info = json.load(f)
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
        raise ValueError(f'{path} was written for PEFT methods {info["methods"]}, '
                         f'the model has {here}')
    if check_fingerprint and base_fingerprint(model) != info['base_fingerprint']:
        raise ValueError(f'{path} was trained on another base model (fingerprint mismatch); '
                         'load the same pretrained weights first or pass check_fingerprint=False')
    tensors = load_file(path)
    adapters = set(adapter_state_dict(model))
    load_adapter_state_dict(model, {k: v for k, v in tensors.items() if k in adapters},
                            strict=strict)
    rest = {k: v for k, v in tensors.items() if k not in adapters}
    result = model.load_state_dict(rest, strict=False)
    if strict and result.unexpected_keys:
        raise KeyError(f'{path}: tensors the model does not have: {result.unexpected_keys[:10]}')
    return info

