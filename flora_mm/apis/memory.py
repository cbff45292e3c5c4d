"""Per-GPU static memory of a config's training run under DDP or FSDP.

``tools/estimate_memory.py`` prints it.

The model is built on the meta device (no memory, no checkpoint read), so InternViT-6B configs
plan in seconds. Per GPU it counts:

- parameters by storage dtype: DDP holds every parameter; FSDP2 holds one ``torch.chunk`` of
  dim 0 per parameter, padded to the first chunk's size (what ``fully_shard`` allocates);
- gradients: trainable parameters only, in their storage dtype (FSDP: sharded);
- optimizer states: from the config's optimizer (AdamW: two moments, SGD with momentum: one...),
  same dtype and sharding as the parameter;
- strategy buffers: DDP's gradient buckets (a second copy of the gradients, mmengine's default
  ``gradient_as_bucket_view=False``); FSDP's unsharded working set: the root unit (heads,
  necks, embeddings stay gathered through forward and backward) plus two of the largest block
  units (the one computing and the one prefetched), parameters in their compute dtype plus
  that unit's unsharded gradients.

Activations are not included: they depend on the batch, the crop and activation
checkpointing, and can only be measured on a GPU.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..engine.fsdp import shard_units

STRATEGIES = ('ddp', 'fsdp')

#: optimizer states per parameter element (same dtype as the parameter); 'step' scalars ignored
_STATES = {
    'AdamW': lambda o: 2 + int(bool(o.get('amsgrad', False))),
    'Adam': lambda o: 2 + int(bool(o.get('amsgrad', False))),
    'Adamax': lambda o: 2,
    'NAdam': lambda o: 2,
    'RAdam': lambda o: 2,
    'Adagrad': lambda o: 1,
    'Adadelta': lambda o: 2,
    'RMSprop': lambda o: 1 + int(o.get('momentum', 0) > 0) + int(bool(o.get('centered', False))),
    'SGD': lambda o: int(o.get('momentum', 0) > 0),
}


def optimizer_states_per_element(optimizer_cfg: dict) -> int:
    """How many parameter-sized state tensors the config's optimizer keeps."""
    opt_type = str(optimizer_cfg.get('type', '')).split('.')[-1]
    if opt_type not in _STATES:
        raise ValueError(f'memory planner: unknown optimizer {opt_type!r}; known: '
                         f'{sorted(_STATES)}')
    return _STATES[opt_type](optimizer_cfg)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def shard_numel(shape: Sequence[int], world: int) -> int:
    """Elements FSDP2 allocates per rank for a parameter: the first (largest) dim-0 chunk."""
    if not shape:
        return 1
    rows = shape[0]
    chunk = -(-rows // world) if rows else 0
    return chunk * math.prod(shape[1:])


@dataclass
class MemoryPlan:
    """Bytes per GPU."""

    strategy: str
    gpus: int
    params: dict = field(default_factory=OrderedDict)    # dtype name -> bytes
    gradients: int = 0
    optimizer: int = 0
    buffers: int = 0        # DDP buckets / FSDP unsharded working set
    buffers_what: str = ''
    optimizer_states: int = 0
    num_params: int = 0
    num_trainable: int = 0

    @property
    def param_bytes(self) -> int:
        return sum(self.params.values())

    @property
    def total(self) -> int:
        return self.param_bytes + self.gradients + self.optimizer + self.buffers

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(param_bytes=self.param_bytes, total=self.total)
        return out


def _unit_of(name: str, units: list[str]) -> str:
    for unit in units:
        if name.startswith(unit + '.'):
            return unit
    return ''  # the root unit


def plan_model(model: nn.Module, optimizer_cfg: dict, gpus: int = 1, strategy: str = 'ddp',
               units: Optional[Sequence[str]] = None,
               param_dtype: Optional[torch.dtype] = None) -> MemoryPlan:
    """Static memory per GPU of training ``model`` (meta or real tensors) with the optimizer.

    ``units`` (FSDP): regexes of the submodules sharded as one unit each (the wrapper's
    ``units``); ``param_dtype``: FSDP's compute dtype of the units (None: storage dtype).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f'gpus must be an integer >= 1, got {gpus!r}')
    states = optimizer_states_per_element(optimizer_cfg)
    plan = MemoryPlan(strategy=strategy, gpus=gpus, optimizer_states=states)
    fsdp = strategy == 'fsdp'
    unit_names = shard_units(model, units) if fsdp else []
    unit_full: dict[str, int] = {}      # unit -> bytes of its gathered params (compute dtype)
    unit_grads: dict[str, int] = {}     # unit -> bytes of its unsharded gradients
    for name, p in model.named_parameters():
        numel = shard_numel(tuple(p.shape), gpus) if fsdp else p.numel()
        size = p.element_size()
        key = _dtype_name(p.dtype)
        plan.params[key] = plan.params.get(key, 0) + numel * size
        plan.num_params += p.numel()
        if p.requires_grad:
            plan.num_trainable += p.numel()
            plan.gradients += numel * size
            plan.optimizer += states * numel * size
        if fsdp:
            unit = _unit_of(name, unit_names)
            compute = size if (param_dtype is None or unit == '' or not p.is_floating_point()) \
                else torch.tensor([], dtype=param_dtype).element_size()
            unit_full[unit] = unit_full.get(unit, 0) + p.numel() * compute
            if p.requires_grad:
                unit_grads[unit] = unit_grads.get(unit, 0) + p.numel() * compute
    if fsdp:
        if gpus > 1:
            blocks = sorted((unit_full[u] + unit_grads.get(u, 0) for u in unit_full if u),
                            reverse=True)
            root = unit_full.get('', 0) + unit_grads.get('', 0)
            plan.buffers = root + sum(blocks[:2])
            plan.buffers_what = 'FSDP unsharded root + 2 largest units (params + grads)'
        else:
            plan.buffers_what = 'FSDP on 1 GPU: nothing is gathered'
    else:
        plan.buffers = plan.gradients if gpus > 1 else 0
        plan.buffers_what = 'DDP gradient buckets' if gpus > 1 else 'single GPU: no buckets'
    return plan


# --------------------------------------------------------------------------- configs
def build_meta_model(cfg) -> nn.Module:
    """The config's model with its PEFT method, on the meta device (no checkpoint read)."""
    from .config import load_config
    from .model import build_model
    return build_model(load_config(cfg), load_pretrained=False, meta=True)


def wrapper_settings(cfg) -> tuple[Optional[list[str]], Optional[torch.dtype]]:
    """(units, param_dtype) of the config's FullyShardedModel wrapper, or defaults; a bf16
    ``AmpOptimWrapper`` means bf16 compute, as ``FSDPRunner.wrap_model`` maps it."""
    wrapper = cfg.get('model_wrapper_cfg', None) or {}
    units = dtype = None
    if str(wrapper.get('type', '')).split('.')[-1] == 'FullyShardedModel':
        dtype = wrapper.get('param_dtype', None)
        units = wrapper.get('units', None)
    optim = cfg.get('optim_wrapper', None) or {}
    if (dtype is None and optim.get('type') == 'AmpOptimWrapper'
            and str(optim.get('dtype')).replace('torch.', '') == 'bfloat16'):
        dtype = 'bfloat16'
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return (list(units) if units is not None else None), dtype


def config_strategy(cfg) -> str:
    wrapper = cfg.get('model_wrapper_cfg', None) or {}
    return 'fsdp' if str(wrapper.get('type', '')).endswith('FullyShardedModel') else 'ddp'


def plan_config(cfg, gpus: int = 1, strategy: Optional[str] = None,
                model: Optional[nn.Module] = None) -> MemoryPlan:
    """:func:`plan_model` for a loaded mmengine Config (``strategy`` None: the config's own)."""
    strategy = strategy or config_strategy(cfg)
    optim = cfg.get('optim_wrapper', None)
    if not optim or 'optimizer' not in optim:
        raise ValueError('memory planner: the config has no optim_wrapper.optimizer')
    units, param_dtype = wrapper_settings(cfg)
    model = model if model is not None else build_meta_model(cfg)
    return plan_model(model, dict(optim['optimizer']), gpus=gpus, strategy=strategy,
                      units=units, param_dtype=param_dtype)


def gib(n: int) -> str:
    return f'{n / 2 ** 30:.2f}'


def format_plan(name: str, plan: MemoryPlan, device_gib: float = 80.0) -> str:
    lines = [f'{name}: {plan.strategy.upper()} on {plan.gpus} GPU(s), per GPU (GiB)']
    for dtype, n in plan.params.items():
        lines.append(f'  parameters {dtype:<10}{gib(n):>10}')
    lines.append(f'  gradients            {gib(plan.gradients):>10}   '
                 f'({plan.num_trainable:,} of {plan.num_params:,} parameters train)')
    lines.append(f'  optimizer states     {gib(plan.optimizer):>10}   '
                 f'({plan.optimizer_states} per trainable element)')
    lines.append(f'  {plan.buffers_what}: {gib(plan.buffers)}')
    fits = 'fits' if plan.total <= device_gib * 2 ** 30 else 'does NOT fit'
    lines.append(f'  total                {gib(plan.total):>10}   ({fits} {device_gib:g} GiB '
                 'before activations; activations are not included)')
    return '\n'.join(lines)


def plan_table(cfg, gpus: Sequence[int] = (1, 8),
               strategies: Sequence[str] = STRATEGIES,
               model: Optional[nn.Module] = None) -> dict[tuple[str, int], MemoryPlan]:
    """Plans of one config for every (strategy, gpus), from one meta-device build."""
    model = model if model is not None else build_meta_model(cfg)
    return {(s, g): plan_config(cfg, gpus=g, strategy=s, model=model)
            for s in strategies for g in gpus}


def format_table(rows: list[tuple[str, dict[tuple[str, int], MemoryPlan]]],
                 device_gib: float = 80.0, host: Optional[dict] = None) -> str:
    """Markdown table: trainable parameters, then GiB per GPU per (strategy, gpus); '!' marks a
    total above ``device_gib`` (before activations). ``host``: {config: {gpus: host plan}}
    (``flora_mm.apis.host_memory.config_host_plan``) adds rank 0's peak host RSS at start /
    save per FSDP column."""
    keys = list(rows[0][1]) if rows else []
    host_gpus = [g for s, g in keys if s == 'fsdp'] if host else []
    head = ['config', 'trainable'] + [f'{s.upper()} x{g}' for s, g in keys] + [
        f'host x{g} start / save' for g in host_gpus]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, plans in rows:
        first = next(iter(plans.values()))
        share = 100.0 * first.num_trainable / max(first.num_params, 1)
        cells = [name, f'{first.num_trainable / 1e6:,.1f}M ({share:.2f}%)']
        for key in keys:
            total = plans[key].total
            mark = ' !' if total > device_gib * 2 ** 30 else ''
            cells.append(f'{total / 2 ** 30:.1f}{mark}')
        for g in host_gpus:
            peaks = host[name][g]['peaks']
            cells.append(f"{peaks['start']['rank0'] / 2 ** 30:.1f} / "
                         f"{peaks['save']['rank0'] / 2 ** 30:.1f}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
