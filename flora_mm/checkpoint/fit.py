"""Whether a file's tensors fit a model: the checks every loader here shares.

Each check compares plain ``{name: tensor}`` dicts (a model's state dict against a file's)
and raises :class:`CheckpointError` naming the file and the first offending tensors; what a
name means (a PEFT method's tensor, a head's) is the caller's business.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..utils import short_list
from .safe_load import CheckpointError


def state_dict_of(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    """The model state of a loaded checkpoint (mmengine ``state_dict`` or a bare dict), without
    a DDP ``module.`` prefix."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} holds no state dict')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != 'meta'
            and not bool(torch.isfinite(v).all())]


def check_finite(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f'{path} holds non-finite values (NaN/Inf) in {len(bad)} '
                              f'tensors [{short_list(bad)}]: the run that wrote it diverged')


def shape_mismatches(own: Mapping[str, torch.Tensor], state: Mapping[str, Any],
                     keys: Iterable[str] | None = None) -> list[str]:
    """``name (file shape) in the file, (model shape) in the model`` for every differing one."""
    keys = own if keys is None else keys
    return [f'{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model'
            for k in keys if k in own and k in state and isinstance(state[k], torch.Tensor)
            and tuple(state[k].shape) != tuple(own[k].shape)]


def check_types(own: Mapping[str, torch.Tensor], state: Mapping[str, Any], path: str) -> None:
    """Every tensor of ``state`` the model has must keep its meaning in the model's dtype:
    floating stays floating (any precision), an integer or bool tensor keeps its dtype. A file
    whose header relabels a float tensor as integer (same bytes) is refused here, naming it."""
    wrong = []
    for key, value in state.items():
        if key not in own:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f'{key} ({type(value).__name__}, not a tensor)')
            continue
        model_dtype = own[key].dtype
        same_kind = (value.is_floating_point() if model_dtype.is_floating_point
                     else value.dtype == model_dtype)
        if not same_kind:
            wrong.append(f'{key} ({value.dtype} in the file, {model_dtype} in the model)')
    if wrong:
        raise CheckpointError(f'{path}: {len(wrong)} tensors have a type the model cannot take '
                              f'without changing their meaning [{short_list(wrong, 3)}]')


def check_keys(own: Mapping[str, torch.Tensor], state: Mapping[str, Any], path: str,
               expected: Iterable[str] | None = None, unexpected_ok: bool = True,
               cause: str = '') -> None:
    """``expected`` names (default: every tensor of the model) must be in ``state`` with the
    model's shape; with ``unexpected_ok=False`` the file may hold nothing else either."""
    expected = list(own if expected is None else expected)
    missing = [k for k in expected if k not in state]
    unexpected = [] if unexpected_ok else [k for k in state if k not in own]
    mismatched = shape_mismatches(own, state, expected)
    if missing or unexpected or mismatched:
        parts = [f'{len(missing)} missing tensors [{short_list(missing)}]']
        if not unexpected_ok:
            parts.append(f'{len(unexpected)} unexpected [{short_list(unexpected)}]')
        parts.append(f'{len(mismatched)} with another shape [{short_list(mismatched, 3)}]')
        raise CheckpointError(f'{path} does not fit the model: {", ".join(parts)}'
                              + (f'; likely cause: {cause}' if cause else ''))


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
