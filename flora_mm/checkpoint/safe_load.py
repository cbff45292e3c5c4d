"""Reading checkpoint files without ever running code from them.

Every file goes through ``torch.load(weights_only=True)`` or safetensors. mmengine's own
checkpoints carry a few non-tensor objects besides (``../shared/REFERENCE.md`` §6: numpy
arrays, dtypes and scalars, ``HistoryBuffer`` and ``builtins.getattr``); they are allowed only
inside :func:`mmengine_checkpoint_globals`, a scoped ``torch.serialization.safe_globals``, and
``getattr`` there is a stand-in that resolves only the attribute lookups those objects need.
A file that needs anything else is refused with :class:`UnsafeCheckpointError`, which names the
file and the global; nothing from the file has run at that point.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs objects whose unpickling could run code: it was not loaded."""


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


def load_checkpoint_file(path: str, map_location: Any = 'cpu', mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    - missing file: FileNotFoundError;
    - a global outside the allowed list (torch's, plus :func:`mmengine_safe_globals` inside
      :func:`mmengine_checkpoint_globals`): :class:`UnsafeCheckpointError`;
    - truncated or corrupt file: :class:`CheckpointError`.

    A directory is read as a DCP checkpoint (``flora_mm.checkpoint.dcp``): the same dict as
    the gathered file, assembled in this process.
    """
    path = osp.expanduser(os.fspath(path))
    if osp.isdir(path):
        from .dcp import load_dcp_checkpoint
        return load_dcp_checkpoint(path, map_location)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} can not be found.')
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        name = _offending_global(path, str(err))
        if 'Unsupported' in str(err) or 'not allowed' in str(err) or 'GLOBAL' in str(err):
            raise UnsafeCheckpointError(
                f'refusing to load {path}: it needs {name}, which is not on the allowed list '
                '(unpickling arbitrary objects can run code). Allowed: tensors, plain Python '
                'values and, inside flora_mm.checkpoint.mmengine_checkpoint_globals() (the tools '
                'run in it), the numpy / HistoryBuffer objects of mmengine checkpoints') from None
        raise CheckpointError(f'cannot read checkpoint {path} (corrupt?): {err}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f'cannot read checkpoint {path} (truncated or corrupt?): '
                              f'{err}') from err


def safe_load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file loader, strict: see ``flora_mm/compat.py`` for why it replaces
    mmengine's (same files load, same result; errors name the file)."""
    return load_checkpoint_file(filename, map_location)


def load_tensor_file(path: str, map_location: Any = 'cpu') -> Mapping:
    """A ``.safetensors`` file through safetensors, anything else through
    :func:`load_checkpoint_file`; errors name the file (:class:`CheckpointError`)."""
    if not path.endswith('.safetensors'):
        return load_checkpoint_file(path, map_location)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} can not be found.')
    from safetensors.torch import load_file
    try:
        return load_file(path, device=str(map_location or 'cpu'))
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointError(f'cannot read {path} (truncated or corrupt?): '
                              f'{type(err).__name__}: {err}') from err


def load_checkpoint_meta(path: str) -> dict:
    """Only the ``meta`` of a checkpoint: a file is memory-mapped (no tensor is read), a DCP
    directory gives its ``extra_state.pth``'s."""
    path = osp.expanduser(os.fspath(path))
    if osp.isdir(path):
        from .dcp import load_dcp_extra
        checkpoint = load_dcp_extra(path)
    else:
        checkpoint = load_checkpoint_file(path, mmap=True)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    return meta if isinstance(meta, dict) else {}
