"""The seed rule: a seeded run starts from the same weights under one process, DDP and FSDP.

Before, the tensors no pretrained file fills (adapters, heads, necks, a backbone's new FPN and
norms) took whatever the global RNG stream held when their initialiser ran. That moment differs
by strategy: the Runner initialises the heads in ``train()`` after building the loops, the
sharded wrapper before sharding, and a model built on the meta device draws nothing at all
while it is built (so it cannot replay the single-process stream: the stream position after a
6B backbone's construction draws can only be reached by drawing them). So the rule no longer
depends on the stream:

    every tensor the pretrained file does not fill is initialised by its module's own
    initialiser, on a whole CPU copy of that module, with the CPU generator seeded from
    ``derive_seed(run seed, module name)``.

Units ("roots") and their initialisers:
- an adapter layer: ``reset_adapter()`` then ``reset_from_base()`` (DoRA's magnitude from the
  loaded W0), seeded by the layer's name;
- a top-level child without pretrained tensors and adapters (decode/auxiliary heads, necks,
  detector heads): ``reset_parameters()`` of each submodule (torch's constructor init), then the
  child's ``init_weights()`` (mmengine's ``init_cfg``, mmcv's ``ConvModule``), seeded by the
  child's name;
- any other module owning tensors the file does not fill (InternViT's simple FPN, new output
  norms): the backbone's ``init_new_module(module)`` if it has one, else ``reset_parameters()``,
  seeded by the module's name.
The same procedure runs on the whole model (one process, DDP, the gathered FSDP start:
:func:`apply_seeded_init`) and on rank 0 of the meta-device start (:func:`seeded_init_values`,
then broadcast into the shards), so the values are equal bit for bit. Why per-module seeds and
not one canonical stream: each root is computed alone (one at a time, on the CPU, never the
whole model), in any order, at any time, and the result is the same; deriving the seed from the
name costs one hash per module. Why a CPU copy: a sharded tensor would draw per shard.
Tensors no initialiser writes (left NaN) are reported: the unsharded paths keep their
constructor values (they are drawn at build time, at the same point under every strategy);
the meta-device start has no such values and refuses.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from typing import Callable, Collection, Iterator

import torch
from mmengine.dist import broadcast
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from torch import nn

from ..models._checkpoint import loaded_keys
from ..peft.base import AdapterLayer


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for ``name`` from the run seed (sha256: independent streams per name)."""
    digest = hashlib.sha256(f'{int(seed)}/{name}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


class _Seeded:
    """The CPU generator seeded for one root; the caller's RNG state is restored on exit."""

    def __init__(self, seed: int, name: str) -> None:
        self.seed = derive_seed(seed, name)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tuple(t.shape), dtype=t.dtype, device='cpu')
    if out.is_floating_point() or out.is_complex():
        out.fill_(float('nan'))  # "not written by any initialiser" (checked afterwards)
    elif out.dtype != torch.bool:
        out.fill_(torch.iinfo(out.dtype).min)
    return out


def _unwritten(t: torch.Tensor) -> bool:
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).any())
    if t.dtype == torch.bool:
        return False
    return bool((t == torch.iinfo(t.dtype).min).any())


def _cpu_twin(module: nn.Module, recurse: bool) -> nn.Module:
    """A copy of ``module`` whose own tensors (and its submodules', with ``recurse``) are new,
    full-size CPU tensors marked unwritten. Written by hand because ``copy.deepcopy`` would
    copy what the module references but does not register (an adapter layer's base layer, its
    W0), and ``to_empty`` on a shallow copy would swap the data of the shared parameters."""
    twin = copy.copy(module)
    twin._parameters = {k: None if p is None else nn.Parameter(_empty_like(p),
                                                               requires_grad=p.requires_grad)
                        for k, p in module._parameters.items()}
    twin._buffers = {k: None if b is None else _empty_like(b)
                     for k, b in module._buffers.items()}
    twin._modules = {k: (None if m is None else _cpu_twin(m, True)) if recurse else m
                     for k, m in module._modules.items()}
    if '_is_init' in module.__dict__:  # mmengine's BaseModule: run init_weights again
        twin._is_init = False
    return twin


def _own_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own state-dict tensors (parameters, persistent buffers)."""
    for k, p in module._parameters.items():
        if p is not None:
            yield k, p
    for k, b in module._buffers.items():
        if b is not None and k not in module._non_persistent_buffers_set:
            yield k, b


def _inside(name: str, prefixes: Collection[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


@torch.no_grad()
def seeded_init_values(model: nn.Module, seed: int, loaded: Collection[str],
                       value: Callable[[str], torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The seed rule's values for every state-dict tensor of ``model`` not in ``loaded``.

    ``model``: whole (unsharded), on any device including meta (only its structure, shapes and
    dtypes are read). ``loaded``: keys a pretrained file filled; ``value(key)``: their tensors
    (DoRA derives its magnitude from W0). Returns (full CPU tensors by key, keys that no
    initialiser wrote).
    """
    loaded = set(loaded)
    out: dict[str, torch.Tensor] = {}
    unwritten: list[str] = []

    def collect(prefix: str, twin: nn.Module, recurse: bool, skip: Collection[str] = ()) -> None:
        items = twin.state_dict(keep_vars=True).items() if recurse else _own_state(twin)
        for k, t in items:
            key = prefix + k
            if key in loaded or k in skip or any(k.startswith(s + '.') for s in skip):
                continue
            t = t.detach()
            (unwritten.append(key) if _unwritten(t) else out.__setitem__(key, t))

    adapters = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    with_loaded = {k.split('.', 1)[0] for k in loaded if '.' in k}
    roots = [n for n, m in model.named_children()
             if n not in with_loaded and not any(_inside(a, [n]) for a in adapters)
             and n != 'backbone']
    # 1. whole top-level children (heads, necks)
    for name in roots:
        child = model.get_submodule(name)
        if not any(True for _ in child.state_dict(keep_vars=True)):
            continue
        twin = _cpu_twin(child, recurse=True)
        with _Seeded(seed, name):
            for sub in twin.modules():
                if hasattr(sub, 'reset_parameters') and callable(sub.reset_parameters):
                    sub.reset_parameters()
            if hasattr(twin, 'init_weights'):
                twin.init_weights()
        collect(name + '.', twin, recurse=True)
    # 2. modules of the children with pretrained tensors (the backbone) owning tensors the file
    # does not fill; a backbone without pretrained tensors keeps its construction values
    owner_init = {}
    for name, module in model.named_modules():
        if hasattr(module, 'init_new_module'):
            owner_init[name] = module.init_new_module
    for name, module in model.named_modules():
        if name and name.split('.', 1)[0] not in with_loaded:
            continue
        if _inside(name, adapters) and name not in adapters:
            continue  # an adapter's own submodules (factor lists): step 3
        prefix = f'{name}.' if name else ''
        own = dict(_own_state(module))
        if isinstance(module, AdapterLayer):  # its adapter tensors: step 3
            own = {k: t for k, t in own.items() if not k.startswith(module.adapter_prefixes)}
        if all(prefix + k in loaded for k in own):
            continue
        twin = _cpu_twin(module, recurse=False)
        owner = max((o for o in owner_init if _inside(name, [o]) or o == ''), key=len,
                    default=None)
        with _Seeded(seed, name):
            if owner is not None:
                owner_init[owner](twin)
            elif hasattr(twin, 'reset_parameters') and not isinstance(twin, AdapterLayer):
                twin.reset_parameters()
        skip = module.adapter_prefixes if isinstance(module, AdapterLayer) else ()
        collect(prefix, twin, recurse=False, skip=skip)
    # 3. adapters, after W0 is known (loaded, or initialised above)
    for name in adapters:
        layer = model.get_submodule(name)
        twin = _cpu_twin(layer, recurse=True)
        prefix = f'{name}.'
        for k, t in _own_state(layer):
            if not k.startswith(layer.adapter_prefixes):
                key = prefix + k
                src = value(key) if key in loaded else out.get(key)
                if src is not None:
                    getattr(twin, k).copy_(src)
        with _Seeded(seed, name):
            twin.reset_adapter()
            twin.reset_from_base()
        for k, t in twin.state_dict(keep_vars=True).items():
            if k.startswith(layer.adapter_prefixes):
                key = prefix + k
                t = t.detach()
                (unwritten.append(key) if _unwritten(t) else out.__setitem__(key, t))
    covered = loaded | set(out) | set(unwritten)
    unwritten += [k for k in model.state_dict(keep_vars=True) if k not in covered]
    return out, unwritten


@torch.no_grad()
def apply_seeded_init(model: nn.Module, seed: int | None) -> dict[str, torch.Tensor]:
    """Re-initialise the tensors of a whole, initialised model (pretrained weights loaded) that
    no pretrained file filled, by the seed rule. Returns the values written."""
    if seed is None:
        return {}
    state = model.state_dict(keep_vars=True)
    loaded = loaded_keys(model)
    values, unwritten = seeded_init_values(model, seed, loaded, lambda k: state[k].detach())
    for key, tensor in values.items():
        state[key].detach().copy_(tensor)
    if unwritten:
        print_log(f'seed rule: no initialiser writes {len(unwritten)} tensor(s) (e.g. '
                  f'{unwritten[:5]}): they keep their values from construction',
                  logger='current', level=logging.DEBUG)
    return values



def run_init_seed(runner) -> int | None:
    """The seed the rule derives from: the Runner's seed, rank 0's where ranks differ
    (``randomness.diff_rank_seed``)."""
    from mmengine.dist import broadcast_object_list, get_world_size
    seed = [getattr(runner, 'seed', None)]
    if get_world_size() > 1:
        broadcast_object_list(seed, src=0)
    return seed[0]


@RUNNERS.register_module()
class FLoRARunner(Runner):
    """mmengine's Runner with the seed rule: after ``init_weights()`` (pretrained weights,
    ``init_cfg``), every tensor no pretrained file filled is re-initialised per module from
    the run seed (:func:`apply_seeded_init`), so one process, DDP and FSDP start from the same
    weights. ``tools/train.py`` builds it when the config names no ``runner_type``."""

    def _init_model_weights(self) -> None:
        model = self.model.module if is_model_wrapper(self.model) else self.model
        if hasattr(model, 'init_weights'):
            model.init_weights()
        apply_seeded_init(model, run_init_seed(self))
        for params in model.state_dict().values():  # as mmengine: ranks equal
            broadcast(params)
        reseed_after_init(self)


def reseed_after_init(runner) -> None:
    """Seed torch's global generators from the run seed once the model is initialised.

    Training draws from them (dropout, drop path, samplers using torch): their state must not
    depend on how the model was built. A whole model draws its construction init from them, a
    meta-device build draws nothing, so without this a sharded start would train with other
    dropout masks than the gathered one. The rank's own seed is used, so
    ``randomness.diff_rank_seed`` keeps its per-rank streams."""
    seed = getattr(runner, 'seed', None)
    if seed is not None:
        torch.manual_seed(derive_seed(seed, 'after init'))
