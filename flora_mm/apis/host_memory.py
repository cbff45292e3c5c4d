"""Per-rank peak host memory (RSS) of a sharded run at its start and at a checkpoint save.

What each scheme holds in host memory, besides the process's own overhead (``overhead``:
interpreter, torch / mmengine / mmseg, the process group, data loader; see
``flora_mm/harness/host_memory.py`` and docs/sharding.md "Host memory"). ``shard``: rank 0's
shard (the largest dim-0 chunk of every parameter, what ``fully_shard`` allocates,
:func:`flora_mm.apis.memory.plan_model`); it is host memory only when the shards live on the
CPU (``device='cpu'``, the gloo runs measured here), GPU memory otherwise:

- gathered start (``meta_init=False``): every rank builds and initialises the whole model on
  the CPU and reads the whole pretrained file (``init_weights`` on every rank), then shards
  it: ``weights + pretrained`` on every rank;
- meta-device start (``meta_init=True``): rank 0 reads the pretrained file and computes the
  tensors the seed rule fills (adapters, FPN, heads) while the model is on the meta device,
  then the values are broadcast tensor by tensor into the shards: rank 0 ``pretrained +
  seeded + largest tensor (+ shard)``, every other rank ``largest tensor (+ shard)`` (one
  broadcast's receive buffer);
- gathered save (the default single-file format): the full model and optimizer state are
  gathered to rank 0's CPU (``cpu_offload``), mmengine serialises the checkpoint into memory
  before writing it (``io.BytesIO``: the state once more), and before that the adapter file
  (``FLoRAHook``) gathers the trained tensors and serialises them (safetensors): rank 0
  ``weights + optimizer + max(weights + optimizer, 2 x trained) (+ shard)``, the others
  ``largest tensor (+ shard)``;
- DCP save (``save_format='dcp'``): every rank writes its own shards, one tensor at a time
  (``largest tensor`` as the bounded buffer); the adapter file is still gathered on rank 0
  (``+ 2 x trained``).

At a save the shard is weights + optimizer state (mmengine's ``zero_grad`` frees the
gradients after each step). The sizes come from the model (:func:`host_sizes`, a meta-device
build in seconds) and the pretrained file (its size on disk where it exists, else the
backbone's pretrained tensors in the file's dtype).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

START_SCHEMES = ('gathered', 'meta')
SAVE_FORMATS = ('full', 'dcp')
DEVICES = ('cuda', 'cpu')
GIB = 2 ** 30


@dataclass
class HostSizes:
    """Bytes of what a sharded run holds, for ``world`` ranks (shard figures: rank 0's)."""

    world: int
    weights: int            # the whole model's parameters + buffers, storage dtypes
    trained: int            # the trainable parameters, whole
    optimizer: int          # the whole optimizer state (states per element x trained)
    pretrained: int         # the pretrained file(s) rank 0 reads (tensors as stored)
    pretrained_in_model: int  # the tensors the file fills, in the model's dtypes
    largest: int            # the largest single tensor (broadcast / gather buffer)
    shard_params: int       # rank 0's shard of the parameters
    shard_grads: int        # ... of the gradients (trainable only)
    shard_optimizer: int    # ... of the optimizer state

    @property
    def seeded(self) -> int:
        """What the seed rule computes on rank 0 of the meta start (not from the file)."""
        return max(self.weights - self.pretrained_in_model, 0)

    @property
    def shard(self) -> int:
        """The target's reference: this rank's weights + gradients + optimizer state."""
        return self.shard_params + self.shard_grads + self.shard_optimizer

    def as_dict(self) -> dict:
        return dict(asdict(self), seeded=self.seeded, shard=self.shard)


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def host_peaks(sizes: HostSizes, meta_init: bool, save_format: str = 'full',
               overhead: int = 0, device: str = 'cuda') -> dict[str, dict[str, int]]:
    """Projected peak RSS in bytes: ``{'start': {'rank0': ..., 'other': ...}, 'save': {...}}``
    for the start scheme (``meta_init``) and ``save_format`` ('full': the gathered file,
    'dcp': one file per rank); ``overhead``: the process's own bytes (measured). ``other`` is
    None on one rank. ``device``: where the shards live; 'cpu' (the gloo runs measured here)
    adds each rank's shard to its host memory, 'cuda' keeps it on the GPU."""
    _check('save_format', save_format, SAVE_FORMATS)
    _check('device', device, DEVICES)
    if not isinstance(overhead, (int, float)) or overhead < 0 or not math.isfinite(overhead):
        raise ValueError(f'overhead must be a finite number of bytes >= 0, got {overhead!r}')
    s = sizes
    on_host = device == 'cpu'
    params = s.shard_params if on_host else 0
    if meta_init:
        start0 = s.pretrained + s.seeded + params + s.largest
        start_other = params + s.largest
    else:
        start0 = start_other = s.weights + s.pretrained
    held = (s.shard_params + s.shard_optimizer) if on_host else 0  # after the step: no grads
    if save_format == 'full':
        # mmengine serialises the checkpoint into memory before writing (io.BytesIO); the
        # adapter file's tensors are gathered (and serialised by safetensors) before that
        save0 = held + s.weights + s.optimizer + max(s.weights + s.optimizer, 2 * s.trained)
    else:
        save0 = held + s.largest + 2 * s.trained
    save_other = held + s.largest
    other = s.world > 1  # one process: no other rank
    return dict(start=dict(rank0=int(start0 + overhead),
                           other=int(start_other + overhead) if other else None),
                save=dict(rank0=int(save0 + overhead),
                          other=int(save_other + overhead) if other else None))


# --------------------------------------------------------------------------- sizes
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _pretrained_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, checkpoint path) of the modules a pretrained file fills through
    flora_mm's loaders (``load_pretrained`` + ``init_cfg=dict(type='Pretrained', ...)``)."""
    from ..models._checkpoint import pretrained_cfg
    found = []
    for name, module in model.named_modules():
        entry, _ = pretrained_cfg(getattr(module, 'init_cfg', None))
        if entry is not None and hasattr(module, 'load_pretrained'):
            found.append((name, module, entry.get('checkpoint')))
    return found


def _file_tensors_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state-dict entries of a backbone that a pretrained file fills: everything but the
    adapters' own tensors and the modules its description says the file lacks
    (``modules_to_save``, e.g. InternViT's simple FPN)."""
    import re

    from ..models._checkpoint import _adapter_prefixes
    from ..models.descriptions import describe
    adapter = _adapter_prefixes()
    new_modules = [re.compile(p) for p in describe(module).modules_to_save()]

    def is_new(key: str) -> bool:
        parts = key.split('.')[:-1]
        return any(p.search('.'.join(parts[:i])) for p in new_modules
                   for i in range(1, len(parts) + 1))

    out = []
    for key, value in module.state_dict(keep_vars=True).items():
        if new_modules and is_new(key):
            continue
        if any(part.startswith(adapter) for part in key.split('.')):
            continue
        out.append((key, value))
    return out


def host_sizes(model: nn.Module, optimizer_cfg: dict, world: int,
               units: Optional[list] = None, file_dtype: Optional[torch.dtype] = None,
               pretrained_bytes: Optional[int] = None) -> HostSizes:
    """:class:`HostSizes` of ``model`` (meta or real) trained with ``optimizer_cfg`` on
    ``world`` ranks. The pretrained file's size: ``pretrained_bytes``, else the file's size on
    disk where the config's file exists, else the tensors it fills in ``file_dtype`` (None:
    the model's own dtypes)."""
    from .memory import optimizer_states_per_element, plan_model
    if not isinstance(world, int) or world < 1:
        raise ValueError(f'world must be an integer >= 1, got {world!r}')
    plan = plan_model(model, optimizer_cfg, gpus=world, strategy='fsdp', units=units)
    states = optimizer_states_per_element(optimizer_cfg)
    params = list(model.parameters())
    tensors = params + [b for b in model.buffers()]
    trained = sum(_nbytes(p) for p in params if p.requires_grad)
    in_model = on_disk = 0
    for _, module, path in _pretrained_modules(model):
        entries = _file_tensors_of(module)
        in_model += sum(_nbytes(v) for _, v in entries)
        if pretrained_bytes is None and isinstance(path, str) and os.path.isfile(path):
            on_disk += os.path.getsize(path)
        else:
            size = (torch.tensor([], dtype=file_dtype).element_size() if file_dtype else None)
            on_disk += sum(v.numel() * (size or v.element_size()) for _, v in entries)
    return HostSizes(
        world=world, weights=sum(_nbytes(t) for t in tensors), trained=trained,
        optimizer=states * trained,
        pretrained=int(pretrained_bytes) if pretrained_bytes is not None else on_disk,
        pretrained_in_model=in_model, largest=max((_nbytes(t) for t in tensors), default=0),
        shard_params=plan.param_bytes, shard_grads=plan.gradients,
        shard_optimizer=plan.optimizer)


def config_host_settings(cfg) -> tuple[bool, str]:
    """(meta_init, save_format) of a config's sharded run (FullyShardedModel wrapper):
    ``model_wrapper_cfg.meta_init`` (default False, as the wrapper's) and the save format
    (``save_format`` in the wrapper config or at the top level, default 'full')."""
    wrapper = cfg.get('model_wrapper_cfg', None) or {}
    meta = bool(wrapper.get('meta_init', False))
    fmt = wrapper.get('save_format', None) or cfg.get('save_format', None) or 'full'
    _check('save_format', fmt, SAVE_FORMATS)
    return meta, fmt


def config_host_sizes(cfg, world: int, model: Optional[nn.Module] = None,
                      file_dtype: Optional[torch.dtype] = None) -> HostSizes:
    """:func:`host_sizes` of a loaded mmengine Config (its optimizer and wrapper units)."""
    from .memory import build_meta_model, wrapper_settings
    optim = cfg.get('optim_wrapper', None)
    if not optim or 'optimizer' not in optim:
        raise ValueError('host memory: the config has no optim_wrapper.optimizer')
    units, _ = wrapper_settings(cfg)
    model = model if model is not None else build_meta_model(cfg)
    return host_sizes(model, dict(optim['optimizer']), world, units=units,
                      file_dtype=file_dtype)


def process_overhead() -> int:
    """The default process overhead: this process's resident set now (bytes). Called after
    the stack is imported and the config's model built on the meta device, it counts what a
    training process holds before its model share: interpreter, torch, mmengine, mmcv / the
    task library, flora_mm (docs/sharding.md "Host memory" compares it with measured runs)."""
    from ..utils.host_memory import current_rss
    return current_rss()


def config_host_plan(cfg, gpus: int, model: Optional[nn.Module] = None,
                     overhead: Optional[int] = None,
                     file_dtype: Optional[torch.dtype] = None, device: str = 'cuda') -> dict:
    """The host side of a config's sharded run on ``gpus`` ranks, for its own start scheme
    and save format: ``{'meta_init', 'save_format', 'device', 'overhead', 'sizes', 'peaks'}``
    (bytes; ``peaks`` from :func:`host_peaks`; ``overhead`` None: :func:`process_overhead`)."""
    meta, fmt = config_host_settings(cfg)
    sizes = config_host_sizes(cfg, gpus, model=model, file_dtype=file_dtype)
    overhead = process_overhead() if overhead is None else int(overhead)
    return dict(meta_init=meta, save_format=fmt, device=device, overhead=overhead,
                sizes=sizes.as_dict(), peaks=host_peaks(sizes, meta, fmt, overhead, device))


def format_host(host: dict) -> str:
    """Text lines of :func:`config_host_plan` (GiB)."""
    def g(n):
        return '-' if n is None else f'{n / GIB:.2f}'
    start = 'meta-device' if host['meta_init'] else 'gathered'
    peaks, sizes = host['peaks'], host['sizes']
    return '\n'.join([
        f"  host RAM per rank ({start} start, {host['save_format']} save, shards on "
        f"{host.get('device', 'cuda')}; process overhead "
        f"{g(host['overhead'])}, shard w+g+o {g(sizes['shard'])}):",
        f"    start  rank 0 {g(peaks['start']['rank0']):>8}   other ranks "
        f"{g(peaks['start']['other']):>8}",
        f"    save   rank 0 {g(peaks['save']['rank0']):>8}   other ranks "
        f"{g(peaks['save']['other']):>8}"])
