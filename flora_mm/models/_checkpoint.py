"""Local-only checkpoint reading shared by the backbones.

The backbones load their own pretrained weights (instead of mmengine's ``PretrainedInit``)
because the files come in foreign key layouts that need converting first, and because adapter
layers may already sit in the model: loading goes by state-dict key, never by module identity.
Nothing here ever touches the network: a URL is refused with a ValueError.

Files from users are untrusted: ``.pth``/``.bin`` files load with ``torch.load(weights_only=True)``
only (a file that needs arbitrary unpickling is refused, naming its unsafe globals), and
``.safetensors`` files, single or sharded (``model.safetensors.index.json`` + shards), through
safetensors. A load that does not fit (nothing matches, a tensor of another shape, a block the
outputs depend on left uninitialised) is a :class:`PretrainedLoadError` naming the file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..checkpoint import CheckpointError, UnsafeCheckpointError, load_tensor_file
from ..utils.misc import short_list

# Prefixes that name a remote or zoo checkpoint; mmengine would download these, we refuse them.
_REMOTE_PREFIXES = ('hf-hub:', 'hf_hub:', 'hf:', 'timm/', 'open-mmlab:', 'openmmlab:', 'mmcls:',
                    'mmpretrain:', 'torchvision:', 'modelzoo:')

# Wrapper keys of common training frameworks (torch/timm 'model', mmengine 'state_dict',
# DeepSpeed as used by InternVL 'module'), unwrapped in this order.
_WRAPPER_KEYS = ('state_dict', 'model', 'module')

# What a directory given as checkpoint is searched for (Hugging Face release layouts).
_DIR_CANDIDATES = ('model.safetensors.index.json', 'model.safetensors',
                   'pytorch_model.bin.index.json', 'pytorch_model.bin')

#: keys of ``dict(type='Pretrained', ...)`` the backbones understand
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location', 'allow_shape_mismatch',
                   'min_loaded_share')
#: default least share (by element count) of the backbone's pretrained tensors a file must fill
DEFAULT_MIN_LOADED_SHARE = 0.5


#: while :func:`capture_pretrained` runs: (module, {key: tensor}) per load_by_keys call
_CAPTURED: Optional[List[Tuple[nn.Module, Dict[str, torch.Tensor]]]] = None


@contextlib.contextmanager
def capture_pretrained() -> Iterator[List[Tuple[nn.Module, Dict[str, torch.Tensor]]]]:
    """Collect what :func:`load_by_keys` loads (after key maps, conversions and every check),
    per module: the sharded start runs the backbones' own loaders on a meta-device model on
    rank 0 and broadcasts the captured tensors into the shards."""
    global _CAPTURED
    previous, _CAPTURED = _CAPTURED, []
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = previous


def loaded_keys(model: nn.Module) -> set:
    """State-dict keys of ``model`` that a pretrained file filled (through
    :func:`load_by_keys`), with their module's prefix."""
    keys = set()
    for name, module in model.named_modules():
        prefix = f'{name}.' if name else ''
        keys.update(prefix + k for k in getattr(module, '_flora_loaded_keys', ()))
    return keys


class PretrainedLoadError(CheckpointError):
    """A pretrained file that cannot be read or does not fit the model; names the file."""


def resolve_local_path(checkpoint: str) -> str:
    """Return the expanded local path, refusing URLs and naming missing files.

    A directory stands for the Hugging Face release inside it (``model.safetensors.index.json``
    with its shards, ``model.safetensors``, or their ``pytorch_model.bin`` counterparts).
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a local file path, got {type(checkpoint).__name__}')
    checkpoint = os.fspath(checkpoint)
    path = os.path.abspath(os.path.expanduser(checkpoint))
    remote = '://' in checkpoint or (checkpoint.startswith(_REMOTE_PREFIXES)
                                     and not os.path.exists(path))
    if remote:
        raise ValueError(
            f'Only local checkpoint files are supported (no downloads), got {checkpoint!r}. '
            'Download the file yourself and pass its path.')
    if os.path.isdir(path):
        for name in _DIR_CANDIDATES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f'Pretrained checkpoint directory {path} holds none of '
                                f'{", ".join(_DIR_CANDIDATES)}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Pretrained checkpoint not found: {path}')
    return path


def read_state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """Read a local .pth/.pt/.bin/.safetensors file, a shard index or a release directory and
    return its (unwrapped) tensor dict."""
    path = resolve_local_path(checkpoint)
    if path.endswith('.index.json'):
        return _read_sharded(path)
    return unwrap_state_dict(_read_file(path), path)


def _read_file(path: str) -> Mapping:
    """One file, safely (``flora_mm.checkpoint.load_tensor_file``: safetensors, or
    ``torch.load(weights_only=True)``), with the pretrained-file advice on refusal."""
    try:
        return load_tensor_file(path, map_location='cpu')
    except UnsafeCheckpointError as err:
        raise PretrainedLoadError(
            f'{err}. Pretrained files must hold plain tensors (torch.save(model.state_dict()) '
            'or safetensors); re-save its state dict in a trusted environment.') from err
    except CheckpointError as err:
        raise PretrainedLoadError(str(err)) from err


def _read_sharded(index_path: str) -> Dict[str, torch.Tensor]:
    """A sharded release: ``weight_map`` of the index names the shard holding each tensor."""
    try:
        with open(index_path, encoding='utf-8') as f:
            weight_map = json.load(f)['weight_map']
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PretrainedLoadError(f'cannot read shard index {index_path}: '
                                  f'{type(err).__name__}: {err}') from err
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise PretrainedLoadError(f'{index_path}: "weight_map" must map tensor names to shard '
                                  'file names')
    root = os.path.dirname(index_path)
    by_shard: Dict[str, List[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    sd: Dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        norm = os.path.normpath(shard)
        if os.path.isabs(norm) or norm.startswith(os.pardir):
            raise PretrainedLoadError(f'{index_path}: shard {shard!r} lies outside {root}')
        shard_path = os.path.join(root, norm)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f'shard {shard_path} named by {index_path} not found')
        part = unwrap_state_dict(_read_file(shard_path), shard_path)
        absent = [k for k in keys if k not in part]
        if absent:
            raise PretrainedLoadError(f'shard {shard_path} lacks {len(absent)} tensor(s) that '
                                      f'{index_path} places there: {_short(absent, 8)}')
        sd.update((k, part[k]) for k in keys)
    return sd


def unwrap_state_dict(obj: Mapping, path: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Strip training wrappers ('state_dict'/'model'/'module' dicts, 'module.' key prefix)."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise PretrainedLoadError(f'{path} does not hold a state dict '
                                  f'(got {type(obj).__name__})')
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise PretrainedLoadError(f'{path} holds no tensors')
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
    handed to ``module.load_pretrained(checkpoint, prefix, **options)`` instead of mmengine's
    PretrainedInit, which would load keys unconverted and download URLs. Its options are
    ``allow_shape_mismatch`` and ``min_loaded_share`` (see :func:`load_by_keys`). Children are
    not re-initialised: timm initialised them at construction. Runs once (``is_init``), so a
    detector's ``init_weights`` after adapter injection does not reload the weights.
    """
    if module.is_init:
        return
    from mmengine.model import initialize
    pretrained, others = pretrained_cfg(module.init_cfg)
    if pretrained is not None:
        unknown = set(pretrained) - set(PRETRAINED_KEYS)
        if unknown:
            raise ValueError(f'init_cfg Pretrained: unknown key(s) {sorted(unknown)}; '
                             f'allowed: {list(PRETRAINED_KEYS)}')
    if others:
        initialize(module, others)
    if pretrained is not None:
        options = {k: pretrained[k] for k in ('allow_shape_mismatch', 'min_loaded_share')
                   if k in pretrained}
        module.load_pretrained(pretrained['checkpoint'], prefix=pretrained.get('prefix'),
                               **options)
    module.is_init = True


def _adapter_prefixes() -> Tuple[str, ...]:
    """Names of the tensors every adapter-layer class adds (never in a pretrained file)."""
    from ..peft.base import AdapterLayer
    names, todo = set(), [AdapterLayer]
    while todo:
        cls = todo.pop()
        names.update(cls.adapter_prefixes)
        todo.extend(cls.__subclasses__())
    return tuple(sorted(names))


def load_by_keys(module: nn.Module, sd: Dict[str, torch.Tensor], name: str,
                 expected_missing: Iterable[str] = (), required: Iterable[str] = (),
                 hint: Optional[Callable[[Dict[str, torch.Tensor]], str]] = None,
                 allow_shape_mismatch: bool = False,
                 min_loaded_share: float = DEFAULT_MIN_LOADED_SHARE,
                 ) -> Tuple[List[str], List[str]]:
    """Load ``sd`` into ``module`` by key and raise :class:`PretrainedLoadError` if it does not fit.

    - ``expected_missing``: key prefixes missing by design (new output norms, the simple FPN);
      adapter tensors are always expected to be missing.
    - ``required``: key prefixes the returned features depend on (everything up to the last
      out index): any of them missing is an error naming the blocks, with ``hint(sd)``.
    - A tensor whose shape differs from the model's is an error naming it, unless
      ``allow_shape_mismatch`` (then it is skipped with a warning and counts as missing).
    - Less than ``min_loaded_share`` of the other tensors' elements loaded (nothing at all
      included) is an error.
    Returns (missing_keys, unexpected_keys); missing includes the expected ones.
    """
    own = module.state_dict()
    adapter = _adapter_prefixes()
    prefixes = tuple(expected_missing)

    def expected(key: str) -> bool:
        return (bool(prefixes) and key.startswith(prefixes)) or any(
            part.startswith(adapter) for part in key.split('.'))

    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched and not allow_shape_mismatch:
        details = '; '.join(f'{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
                            for k in mismatched[:6])
        more = f' (and {len(mismatched) - 6} more)' if len(mismatched) > 6 else ''
        raise PretrainedLoadError(
            f'{name}: {len(mismatched)} tensor(s) have another shape than the model\'s: '
            f'{details}{more}. A checkpoint of another model size? (init_cfg '
            "Pretrained(allow_shape_mismatch=True) skips them, leaving them random.)")
    for k in mismatched:
        print_log(f'{name}: skip {k}, checkpoint shape {tuple(sd[k].shape)} != model shape '
                  f'{tuple(own[k].shape)} (allow_shape_mismatch)', logger='current',
                  level=logging.WARNING)
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    loaded = [k for k in sd if k in own]
    if not loaded:
        raise PretrainedLoadError(
            f'{name}: no tensor of the file matches the model (file keys: '
            f'{_short(sorted(sd), 5)}; model keys: {_short(sorted(own), 5)}). Another model, '
            "or a detector/segmentor checkpoint that needs prefix='backbone.'?")
    with warnings.catch_warnings():  # a meta-device model (sharded start): copies are no-ops
        warnings.filterwarnings('ignore', message='.*copying from a non-meta parameter')
        result = module.load_state_dict(sd, strict=False)
    # which keys the file filled: the seed rule initialises every other tensor
    # (flora_mm/engine/seeded_init.py); the sharded start takes the tensors themselves
    module._flora_loaded_keys = tuple(loaded)
    if _CAPTURED is not None:
        _CAPTURED.append((module, {k: sd[k] for k in loaded}))
    missing = list(result.missing_keys) + mismatched
    unexpected = list(result.unexpected_keys)
    expected_keys = [k for k in missing if expected(k)]
    other_missing = [k for k in missing if not expected(k)]

    req = tuple(required)
    req_missing = [k for k in other_missing if req and k.startswith(req)]
    if req_missing:
        blocks = list(dict.fromkeys(_block_of(k) for k in req_missing))
        raise PretrainedLoadError(
            f'{name}: the checkpoint leaves {_short(blocks, 12)} uninitialised, but the '
            f'outputs depend on them. {hint(sd) if hint else ""}'.rstrip())

    counted = {k: v for k, v in own.items() if not expected(k)}
    total = sum(v.numel() for v in counted.values())
    share = sum(counted[k].numel() for k in loaded if k in counted) / max(total, 1)
    if share < min_loaded_share:
        raise PretrainedLoadError(
            f'{name}: the file fills only {share:.1%} of the backbone\'s pretrained tensors '
            f'(least share: {min_loaded_share:.0%}); missing e.g. {_short(other_missing, 8)}')

    print_log(f'{name}: loaded {len(loaded)} tensors ({share:.1%} of the backbone)',
              logger='current')
    if expected_keys:
        print_log(f'{name}: missing keys (expected, newly initialised): {_short(expected_keys)}',
                  logger='current')
    if other_missing:
        print_log(f'{name}: missing keys (not used by the outputs): {_short(other_missing)}',
                  logger='current', level=logging.WARNING)
    if unexpected:
        print_log(f'{name}: unexpected keys: {_short(unexpected)}', logger='current',
                  level=logging.WARNING)
    return missing, unexpected


def _block_of(key: str) -> str:
    """The block (``...blocks.N``) or module a key belongs to, for messages."""
    m = re.match(r'^(.*?\bblocks\.\d+)\.', key)
    return m[1] if m else key.rsplit('.', 1)[0]


def _short(keys: Sequence[str], limit: int = 40) -> str:
    return short_list(keys, limit=limit)  # logs name up to 40 keys
