"""Reading and writing training checkpoints without ever running code from a file.

Loading: every checkpoint goes through ``torch.load(weights_only=True)``. mmengine's own
checkpoints carry a few non-tensor objects besides (``../shared/REFERENCE.md`` §6: numpy
arrays, dtypes and scalars, ``HistoryBuffer`` and ``builtins.getattr``); they are allowed only
inside :func:`mmengine_checkpoint_globals`, a scoped ``torch.serialization.safe_globals``, and
``getattr`` there is a stand-in that resolves only the attribute lookups those objects need.
A file that needs anything else is refused with :class:`UnsafeCheckpointError`, which names the
file and the global; nothing from the file has run at that point.

Writing: :func:`plain_checkpoint` turns what mmengine puts into a checkpoint into plain Python
values and tensors (the inverse, :func:`restore_message_hub`, runs on load), so the checkpoints
flora_mm writes load with the bare ``weights_only=True`` loader. :class:`AtomicLocalBackend`
writes each file under a temporary name and renames it into place, so a kill leaves either the
old file or the new one. :func:`find_resumable_checkpoint` picks the newest checkpoint that
actually loads when ``last_checkpoint`` is empty, dangling or names a truncated file.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import os.path as osp
import pickle
import random
import re
import zipfile
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging import HistoryBuffer, print_log

from ..utils import atomic_paths, short_list

#: name of the file backend that writes atomically (``CheckpointHook(backend_args=...)``)
ATOMIC_BACKEND = 'flora_mm_atomic_local'
#: key of flora_mm's own entries in a checkpoint (RNG state, PEFT methods, adapter file)
CKPT_KEY = 'flora_mm'
_HISTORY_MARK = '__mmengine_history_buffer__'


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs objects whose unpickling could run code: it was not loaded."""


# ----------------------------------------------------------------------------- safe loading
def _numpy_core():
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _getattr_allowed() -> dict[int, frozenset[str]]:
    """Objects (by id) and the attribute names ``getattr`` may look up on them in a checkpoint.

    Python pickles a function defined in a class as ``getattr(cls, name)``. In mmengine's
    checkpoints that is the only use: every ``HistoryBuffer`` of the message hub carries its
    statistics methods (``HistoryBuffer.min``, ``.max``, ``.current``, ``.mean``). Exactly those
    lookups are served; any other ``getattr`` (a dunder, a module attribute) is refused.
    """
    return {id(HistoryBuffer): frozenset({'min', 'max', 'current', 'mean'})}


def _limited_getattr(obj: Any, name: str) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling (see :func:`_getattr_allowed`)."""
    allowed = _getattr_allowed().get(id(obj))
    if not isinstance(name, str) or allowed is None or name not in allowed:
        raise pickle.UnpicklingError(
            f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is not allowed '
            'in a checkpoint')
    return getattr(obj, name)


def mmengine_safe_globals() -> list:
    """Exactly the non-tensor objects mmengine (and so OpenMMLab) checkpoints hold.

    torch's allow-list maps a pickled name to an object; ``builtins.getattr`` is mapped to
    :func:`_limited_getattr`, so the real ``getattr`` is never reachable from a file.
    """
    multiarray = _numpy_core()
    dtype_classes = [type(np.dtype(t)) for t in
                     ('float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
                      'uint8', 'bool')]
    # files written under numpy 1.x name the same functions ``numpy.core.multiarray.*``
    aliases = [(multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
               (multiarray.scalar, 'numpy.core.multiarray.scalar')]
    return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, HistoryBuffer,
            *dtype_classes, *aliases, (_limited_getattr, 'builtins.getattr')]


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Allow :func:`mmengine_safe_globals` for ``weights_only`` loads inside the block only.

    The tools run training and testing inside it, so checkpoints written by plain mmengine
    (resume, ``load_from``) load too; outside it nothing beyond torch's own list is allowed.
    """
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield


def _offending_global(path: str, message: str) -> str:
    match = re.search(r'GLOBAL ([\w.]+)', message) or re.search(r'(getattr\([^)]*\))', message)
    if match:
        return match.group(1)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  (best effort: only for the message)
        return 'an object outside the allowed list'
    return ', '.join(found) if found else 'an object outside the allowed list'


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    - missing file: FileNotFoundError;
    - a global outside the allowed list (torch's, plus :func:`mmengine_safe_globals` inside
      :func:`mmengine_checkpoint_globals`): :class:`UnsafeCheckpointError`;
    - truncated or corrupt file: :class:`CheckpointError`.
    """
    path = osp.expanduser(os.fspath(path))
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} can not be found.')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = _offending_global(path, str(err))
        if 'Unsupported' in str(err) or 'not allowed' in str(err) or 'GLOBAL' in str(err):
            raise UnsafeCheckpointError(
                f'refusing to load {path}: it needs {name}, which is not on the allowed list '
                '(unpickling arbitrary objects can run code). Allowed: tensors, plain Python '
                'values and, inside flora_mm.engine.mmengine_checkpoint_globals() (the tools '
                'run in it), the numpy / HistoryBuffer objects of mmengine checkpoints') from None
        raise CheckpointError(f'cannot read checkpoint {path} (corrupt?): {err}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f'cannot read checkpoint {path} (truncated or corrupt?): '
                              f'{err}') from err


def safe_load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file loader, strict: see ``flora_mm/compat.py`` for why it replaces
    mmengine's (same files load, same result; errors name the file)."""
    return load_checkpoint_file(filename, map_location)


# ----------------------------------------------------------------------------- plain writing
def _plain(value: Any, where: str, dropped: list[str]) -> Any:
    """numpy and other objects as plain values; unknown objects are dropped (reported)."""
    if isinstance(value, np.generic):  # first: np.float64 is also a float
        return value.item()
    if isinstance(value, torch.Tensor) or value is None or isinstance(
            value, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, HistoryBuffer):
        log, count = value.data
        return {_HISTORY_MARK: True, 'log': torch.from_numpy(np.asarray(log, np.float64).copy()),
                'count': torch.from_numpy(np.asarray(count, np.float64).copy()),
                'max_length': int(value.max_length)}
    if isinstance(value, dict):
        # torch's allow-list has dict, OrderedDict and Counter; other mappings become dicts
        out = type(value)() if type(value) in (dict, OrderedDict, Counter) else {}
        for key, item in value.items():
            converted = _plain(item, f'{where}.{key}', dropped)
            if converted is not _DROP:
                out[key.item() if isinstance(key, np.generic) else key] = converted
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, f'{where}[{i}]', dropped) for i, v in enumerate(value)]
        items = [v for v in items if v is not _DROP]
        return type(value)(items) if type(value) in (list, tuple, set, frozenset) else items
    dropped.append(f'{where} ({type(value).__name__})')
    return _DROP


_DROP = object()


def plain_checkpoint(checkpoint: dict) -> list[str]:
    """Turn the non-tensor parts mmengine puts into a checkpoint into plain values, in place.

    ``state_dict`` and ``optimizer`` are left alone (tensors and torch's own plain state).
    Returns the entries that had to be dropped (objects with no plain form).
    """
    dropped: list[str] = []
    for key in list(checkpoint):
        if key in ('state_dict', 'optimizer'):
            continue
        value = _plain(checkpoint[key], key, dropped)
        if value is _DROP:
            del checkpoint[key]
        else:
            checkpoint[key] = value
    return dropped


def restore_message_hub(checkpoint: dict) -> None:
    """Turn the plain history buffers of :func:`plain_checkpoint` back into HistoryBuffers."""
    hub = checkpoint.get('message_hub')
    if not isinstance(hub, dict) or not isinstance(hub.get('log_scalars'), dict):
        return
    for key, value in list(hub['log_scalars'].items()):
        if isinstance(value, dict) and value.get(_HISTORY_MARK):
            hub['log_scalars'][key] = HistoryBuffer(value['log'].numpy(), value['count'].numpy(),
                                                    value['max_length'])


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """python, numpy, torch (and CUDA, when initialised) random states as plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[version, list(internal), gauss],
                 numpy=[name, torch.from_numpy(np.asarray(keys, np.int64)), int(pos),
                        int(has_gauss), float(cached)],
                 torch=torch.get_rng_state(), cuda=[])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- files
class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend whose ``put`` writes a temporary file and renames it, so a
    reader (or a resume after a kill) never sees a half-written checkpoint."""

    def put(self, obj: bytes, filepath) -> None:
        with atomic_paths(os.fspath(filepath)) as (tmp,):
            with open(tmp, 'wb') as f:
                f.write(obj)


# registered under its own name only: nothing changes for code that does not ask for it
register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def _checkpoint_candidates(work_dir: str) -> list[str]:
    """Regular checkpoints in ``work_dir``, newest first (by epoch/iter number, then mtime)."""
    found = []
    for path in glob.glob(osp.join(work_dir, '*.pth')):
        match = re.fullmatch(r'(epoch|iter)_(\d+)\.pth', osp.basename(path))
        if match:
            found.append((int(match.group(2)), osp.getmtime(path), path))
    return [p for _, _, p in sorted(found, reverse=True)]


def _unreadable(path: str) -> str | None:
    """None if ``path`` is a complete checkpoint file, else the reason.

    torch writes a zip archive whose directory sits at the very end, so a truncated file has
    none; opening the archive reads only that directory (cheap for any checkpoint size).
    """
    if not osp.isfile(path):
        return 'no such file'
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f'not a complete checkpoint (truncated?): {err}'
    if not any(n.endswith('data.pkl') for n in names):
        return 'not a torch checkpoint (no data.pkl)'
    return None


def find_resumable_checkpoint(work_dir: str,
                              log: Callable[[str, int], None] | None = None) -> str | None:
    """The checkpoint an auto ``--resume`` should use, or None if there is none.

    ``last_checkpoint`` first; when it is empty, names a missing file, or a file that does not
    load (truncated), the newest ``epoch_N.pth`` / ``iter_N.pth`` in ``work_dir`` that loads,
    saying so through ``log(message, level)``.
    """
    def say(message: str, level: int = logging.WARNING) -> None:
        (log or (lambda m, lv: print_log(m, logger='current', level=lv)))(message, level)

    pointer = osp.join(work_dir, 'last_checkpoint')
    named = None
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
        if named is None:
            say(f'{pointer} is empty')
        else:
            reason = _unreadable(named)
            if reason is None:
                return named
            say(f'{pointer} names {named}, which cannot be used: {reason}')
    for path in _checkpoint_candidates(work_dir):
        if named is not None and osp.abspath(path) == osp.abspath(named):
            continue
        reason = _unreadable(path)
        if reason is None:
            if osp.isfile(pointer):
                say(f'resuming from the newest complete checkpoint instead: {path}')
            return path
        say(f'skipping {path}: {reason}')
    return None


# ----------------------------------------------------------------------------- fit checks
def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != 'meta'
            and not bool(torch.isfinite(v).all())]


def checkpoint_state_dict(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    """The model state of a loaded checkpoint (mmengine ``state_dict`` or a bare dict)."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} holds no state dict')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def peft_methods(model: torch.nn.Module) -> dict:
    """The injected methods' configs as JSON-like values (what a checkpoint records)."""
    import json

    from ..peft import injected_roots
    return json.loads(json.dumps({name: method.to_dict()
                                  for name, _, method in injected_roots(model)}, default=str))


def describe_changes(old: Any, new: Any, where: str = '') -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f'{where}.{key}' if where else str(key)
            if key not in new:
                out.append(f'{sub}: {old[key]!r} -> (absent)')
            elif key not in old:
                out.append(f'{sub}: (absent) -> {new[key]!r}')
            else:
                out += describe_changes(old[key], new[key], sub)
        return out
    return [] if old == new else [f'{where}: {old!r} -> {new!r}']


def check_checkpoint_fits(model: torch.nn.Module, checkpoint: Any, path: str,
                          complete: bool) -> None:
    """Raise CheckpointError unless ``checkpoint`` fits the PEFT ``model``.

    ``complete`` (resume, test): every tensor of the model must be in the file, with its
    shape, and finite. Otherwise (``load_from`` to start a fine-tuning): the method's tensors
    must be all present or all absent (a plain checkpoint), and those present must fit.
    With ``complete``, a checkpoint that records its PEFT methods must record the model's.
    """
    from ..peft import adapter_state_dict
    state = checkpoint_state_dict(checkpoint, path)
    info = checkpoint.get(CKPT_KEY) if isinstance(checkpoint, dict) else None
    here = peft_methods(model)
    if (complete and isinstance(info, dict) and info.get('methods') is not None
            and info['methods'] != here):
        changes = describe_changes(info['methods'], here)
        raise CheckpointError(f'{path} was written with other PEFT settings; changed: '
                              f'{"; ".join(changes[:10])}')
    own = model.state_dict()
    method_keys = [k for k in adapter_state_dict(model) if k in own]
    mismatched = [f'{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model'
                  for k in own if k in state and isinstance(state[k], torch.Tensor)
                  and tuple(state[k].shape) != tuple(own[k].shape)]
    if complete:
        missing = [k for k in own if k not in state]
    else:
        present = [k for k in method_keys if k in state]
        missing = [k for k in method_keys if k not in state] if present else []
        mismatched = [m for m in mismatched if m.split(' ')[0] in set(method_keys)]
    if missing or mismatched:
        absent_method = [k for k in missing if k in set(method_keys)]
        cause = ('another PEFT method or rank, another model size or head, a merged checkpoint, '
                 'or a file saved from one shard/rank only')
        if mismatched and not missing:
            cause = 'another rank or model size'
        elif absent_method and len(absent_method) == len(method_keys):
            cause = ('the file has no tensors of the PEFT method: a plain or merged checkpoint '
                     '(test a merged file with the config merge_adapters wrote beside it)')
        raise CheckpointError(
            f'{path} does not fit the model: {len(missing)} missing tensors '
            f'[{short_list(missing)}], {len(mismatched)} with another shape '
            f'[{short_list(mismatched, 3)}]; likely cause: {cause}')
    if complete:
        bad = non_finite_tensors({k: state[k] for k in own if k in state})
        if bad:
            raise CheckpointError(f'{path} holds non-finite values (NaN/Inf) in {len(bad)} '
                                  f'tensors [{short_list(bad)}]: the run that wrote it diverged')
