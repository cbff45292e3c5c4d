"""Formatting and hashing helpers used in more than one module."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def short_list(items: Iterable[str], limit: int = 5) -> str:
    """``a, b, c, ... (N in all)``: error and log messages name a few items, not thousands."""
    items = list(items)
    text = ', '.join(str(i) for i in items[:limit])
    return text + (f', ... ({len(items)} in all)' if len(items) > limit else '')


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a (CPU copy of a) tensor, for hashing whatever its dtype."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def config_dicts(node: Any) -> Iterator[dict]:
    """Every dict in a config tree (nested dicts, lists and tuples), parents before children:
    how a model config finds the sub-configs of a given ``type``."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from config_dicts(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from config_dicts(value)
