"""The process's random state as plain values, for checkpoints that resume exactly."""
from __future__ import annotations

import random

import numpy as np
import torch


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
