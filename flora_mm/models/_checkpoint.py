"""Local-only checkpoint reading shared by the backbones.

The backbones load their own pretrained weights (instead of mmengine's ``PretrainedInit``)
because the files come in foreign key layouts that need converting first, and because adapter
layers may already sit in the model: loading goes by state-dict key, never by module identity.
Nothing here ever touches the network: a URL is refused with a ValueError.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..utils.misc import short_list

# Prefixes that name a remote or zoo checkpoint; mmengine would download these, we refuse them.
_REMOTE_PREFIXES = ('hf-hub:', 'hf_hub:', 'hf:', 'timm/', 'open-mmlab:', 'openmmlab:', 'mmcls:',
                    'mmpretrain:', 'torchvision:', 'modelzoo:')

# Wrapper keys of common training frameworks (torch/timm 'model', mmengine 'state_dict',
# DeepSpeed as used by InternVL 'module'), unwrapped in this order.
_WRAPPER_KEYS = ('state_dict', 'model', 'module')


def resolve_local_path(checkpoint: str) -> str:
    """Return the expanded local path, refusing URLs and naming missing files."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a local file path, got {type(checkpoint).__name__}')
    checkpoint = os.fspath(checkpoint)
    path = os.path.abspath(os.path.expanduser(checkpoint))
    remote = '://' in checkpoint or (checkpoint.startswith(_REMOTE_PREFIXES)
                                     and not os.path.isfile(path))
    if remote:
        raise ValueError(
            f'Only local checkpoint files are supported (no downloads), got {checkpoint!r}. '
            'Download the file yourself and pass its path.')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Pretrained checkpoint not found: {path}')
    return path


def read_state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """Read a local .pth/.pt/.bin/.safetensors file and return its (unwrapped) tensor dict."""
    path = resolve_local_path(checkpoint)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        obj = load_file(path, device='cpu')
    else:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            # Official training checkpoints also pickle argparse Namespaces, numpy scalars, ...
            # which torch >= 2.6's weights_only loader refuses. The user named this local file.
            print_log(f'{path} holds non-tensor objects; loading it with weights_only=False',
                      logger='current', level=logging.WARNING)
            obj = torch.load(path, map_location='cpu', weights_only=False)
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: Mapping) -> Dict[str, torch.Tensor]:
    """Strip training wrappers ('state_dict'/'model'/'module' dicts, 'module.' key prefix)."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TypeError(f'checkpoint does not hold a state dict (got {type(obj).__name__})')
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith('module.') for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def select_prefix(sd: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """Keep keys under ``prefix`` (e.g. 'backbone.' of a detector checkpoint) without it."""
    if not prefix:
        return sd
    if not prefix.endswith('.'):
        prefix += '.'
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f'no key of the checkpoint starts with prefix {prefix!r}')
    return out


def pretrained_cfg(init_cfg) -> Tuple[Optional[dict], List[dict]]:
    """Split an mmengine ``init_cfg`` into its Pretrained entry and the other entries."""
    if not init_cfg:
        return None, []
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
    pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
    others = [c for c in cfgs if c.get('type') != 'Pretrained']
    return (dict(pretrained[-1]) if pretrained else None), others


def init_weights_from_cfg(module) -> None:
    """``init_weights`` body shared by the backbones (``module`` is an mmengine BaseModule).

    Non-pretrained init configs go through mmengine's ``initialize``; a 'Pretrained' entry is
    handed to ``module.load_pretrained(checkpoint, prefix)`` instead of mmengine's
    PretrainedInit, which would load keys unconverted and download URLs. Children are not
    re-initialised: timm initialised them at construction. Runs once (``is_init``), so a
    detector's ``init_weights`` after adapter injection does not reload the weights.
    """
    if module.is_init:
        return
    from mmengine.model import initialize
    pretrained, others = pretrained_cfg(module.init_cfg)
    if others:
        initialize(module, others)
    if pretrained is not None:
        module.load_pretrained(pretrained['checkpoint'], prefix=pretrained.get('prefix'))
    module.is_init = True


def load_by_keys(module: nn.Module, sd: Dict[str, torch.Tensor], name: str,
                 expected_missing: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """Load ``sd`` into ``module`` by key (strict=False) and log what did not match.

    Tensors whose shape differs from the model's are left out (``load_state_dict`` would raise
    even with strict=False) and reported as unexpected. ``expected_missing`` are key prefixes
    that are missing by design (e.g. new output norms) and logged at INFO level only.
    Returns (missing_keys, unexpected_keys).
    """
    own = module.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        print_log(f'{name}: skip {k}, checkpoint shape {tuple(sd[k].shape)} != model shape '
                  f'{tuple(own[k].shape)}', logger='current', level=logging.WARNING)
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    result = module.load_state_dict(sd, strict=False)
    missing = list(result.missing_keys) + mismatched
    unexpected = list(result.unexpected_keys)
    prefixes = tuple(expected_missing)
    expected = [k for k in missing if prefixes and k.startswith(prefixes)]
    other_missing = [k for k in missing if k not in expected]
    print_log(f'{name}: loaded {len(sd) - len(unexpected)} tensors', logger='current')
    if expected:
        print_log(f'{name}: missing keys (expected, newly initialised): {_short(expected)}',
                  logger='current')
    if other_missing:
        print_log(f'{name}: missing keys: {_short(other_missing)}', logger='current',
                  level=logging.WARNING)
    if unexpected:
        print_log(f'{name}: unexpected keys: {_short(unexpected)}', logger='current',
                  level=logging.WARNING)
    return missing, unexpected


def _short(keys: Sequence[str]) -> str:
    return short_list(keys, limit=40)  # logs name up to 40 keys
