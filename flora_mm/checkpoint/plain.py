"""Checkpoint contents as plain values: what ``torch.load(weights_only=True)`` reads back.

mmengine puts numpy scalars and arrays and ``HistoryBuffer`` objects into a checkpoint's
``meta`` and ``message_hub``; :func:`plain_checkpoint` turns them into plain Python values and
tensors before the file is written, and :func:`restore_message_hub` turns the history buffers
back on load. :func:`to_plain` is the one converter for configs and metadata elsewhere.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

#: key of flora_mm's own entries in a checkpoint (random state, PEFT methods, adapter file)
CKPT_KEY = 'flora_mm'
_HISTORY_MARK = '__mmengine_history_buffer__'
_DROP = object()
_LEAVES = (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)


def to_plain(value: Any, unknown: str = 'keep', sequences: str = 'list',
             dropped: list[str] | None = None, where: str = '') -> Any:
    """``value`` with mappings as dicts and numpy values as Python ones, recursively.

    ``sequences``: 'list' turns tuples and sets into lists (configs for copying, hashing and
    printing), 'keep' keeps built-in sequence types. ``unknown`` decides what happens to other
    objects: 'keep' them, 'str' them (metadata a reader must load without unpickling), or
    'drop' them (their paths are appended to ``dropped``). Tensors and None stay as they are.
    """
    if isinstance(value, np.generic):  # first: np.float64 is also a float
        return value.item()
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, _LEAVES):
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
            converted = to_plain(item, unknown, sequences, dropped, f'{where}.{key}')
            if converted is not _DROP:
                out[key.item() if isinstance(key, np.generic) else key] = converted
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_plain(v, unknown, sequences, dropped, f'{where}[{i}]')
                 for i, v in enumerate(value)]
        items = [v for v in items if v is not _DROP]
        if sequences == 'keep' and type(value) in (list, tuple, set, frozenset):
            return type(value)(items)
        return items
    if unknown == 'str':
        return str(value)
    if unknown == 'drop':
        if dropped is not None:
            dropped.append(f'{where} ({type(value).__name__})')
        return _DROP
    return value


def plain_checkpoint(checkpoint: dict) -> list[str]:
    """Turn the non-tensor parts mmengine puts into a checkpoint into plain values, in place.

    ``state_dict`` and ``optimizer`` are left alone (tensors and torch's own plain state).
    Returns the entries that had to be dropped (objects with no plain form).
    """
    dropped: list[str] = []
    for key in list(checkpoint):
        if key in ('state_dict', 'optimizer'):
            continue
        value = to_plain(checkpoint[key], 'drop', 'keep', dropped, key)
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
