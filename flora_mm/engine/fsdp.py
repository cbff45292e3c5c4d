"""Sharded training with torch FSDP2 (``fully_shard``) through mmengine's Runner.

Why FSDP2: it shards every parameter separately (DTensor on dim 0), so a frozen bf16 base and
fp32 adapters can live in the same block; FSDP1's flat parameters need one dtype and one
``requires_grad`` per unit. mmengine 0.10.7's own ``FSDPStrategy`` wraps with FSDP1 and a CUDA
``device_id``, so it cannot run on the CPU.

Two registered pieces, switched on by ``configs/_base_/fsdp.py`` (any leaf config + that
fragment = its sharded variant; no new command-line arguments):

- ``model_wrapper_cfg=dict(type='FullyShardedModel', ...)`` (``MODEL_WRAPPERS``): the Runner's
  own route for distributed wrappers. With ``meta_init=True`` (configs/_base_/fsdp.py) the
  Runner built the parameters on the meta device and it starts the model shard by shard
  (:func:`meta_start`: rank 0 reads the pretrained files, the rest follows the seed rule of
  ``seeded_init.py``, broadcast into the shards). Otherwise it initialises the model
  (pretrained weights, adapters) while it is still whole, makes the ranks equal (as DDP
  does). Either way it calls ``fully_shard`` on
  one unit per InternViT block / ConvNeXt-V2 block (+ the stem / patch embedding) and on the
  root. Optional composable (non-reentrant) activation checkpointing per unit, and a
  ``MixedPrecisionPolicy``. Without ``--launcher`` the Runner does not wrap at all: the same
  config then trains unsharded on one device.
- ``runner_type='FSDPRunner'`` (``RUNNERS``): checkpoints. mmengine saves on rank 0 only, and
  a sharded model's ``state_dict()`` holds shards: rank 0 alone would write an incomplete file.
  With ``model_wrapper_cfg.save_format='full'`` (the default) every rank takes part in
  gathering the complete model and optimizer state (``torch.distributed.checkpoint.state_dict``,
  full state, offloaded to the CPU), rank 0 writes an ordinary mmengine checkpoint; loading
  (``load_from``, ``--resume``, ``tools/test.py``) reads the file on rank 0 and broadcasts it
  into the shards. With ``save_format='dcp'`` each rank writes its own shards into a
  ``torch.distributed.checkpoint`` directory with the checkpoint's name
  (``flora_mm.checkpoint.dcp``) and reads back only the chunks its shards need (resharded by
  DCP). Both are independent of the world size, so a run resumes on any number of processes,
  and ``tools/test.py`` / ``tools/merge_adapters.py`` read either.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import os.path as osp
import re
import time
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from mmengine.dist import broadcast_object_list, get_rank, is_main_process
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner.checkpoint import _load_checkpoint, save_checkpoint
from mmengine.utils import apply_to
from torch import nn

from ..checkpoint import (ATOMIC_BACKEND, CheckpointError, check_dcp_checkpoint,
                          commit_companions, discard_companions, is_dcp_checkpoint,
                          load_dcp_into, write_dcp_checkpoint)
from ..checkpoint.dcp import (MODEL_KEY, OPTIM_KEY, PARAM_GROUPS_KEY, dcp_key_paths,
                              dcp_tensor_specs, load_dcp_extra)
from ..dist import gather_full
from ..models import describe
from ..models._checkpoint import capture_pretrained, init_weights_from_cfg, pretrained_cfg
from ..models.meta import meta_parameters
from ..peft.base import AdapterLayer
from ..utils.host_memory import HostMemoryRecorder
from .seeded_init import (FLoRARunner, apply_seeded_init, reseed_after_init, run_init_seed,
                          seeded_init_values)

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16,
           None: None}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(value, torch.dtype) or value is None:
        return value
    if value not in _DTYPES:
        raise ValueError(f'dtype must be one of {sorted(k for k in _DTYPES if k)} or None, '
                         f'got {value!r}')
    return _DTYPES[value]


#: how FSDPRunner writes checkpoints (``model_wrapper_cfg.save_format``)
SAVE_FORMATS = {
    'full': 'one ordinary mmengine checkpoint file, gathered and written by rank 0',
    'dcp': 'a torch.distributed.checkpoint directory, each rank writes its own shards',
}


def check_save_format(value: Any) -> str:
    """``value`` if it is one of :data:`SAVE_FORMATS`, else a ValueError saying what is."""
    if not isinstance(value, str) or value not in SAVE_FORMATS:
        choices = '; '.join(f'{k!r}: {v}' for k, v in SAVE_FORMATS.items())
        raise ValueError(f'model_wrapper_cfg.save_format must be one of {sorted(SAVE_FORMATS)} '
                         f'({choices}), got {value!r}')
    return value


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (or it wraps such a model)."""
    from torch.distributed.fsdp import FSDPModule
    if is_model_wrapper(model):
        model = model.module
    return isinstance(model, FSDPModule)


def described_units(model: nn.Module) -> list[str]:
    """The FSDP units the backbone's description names (its blocks, stem / patch embedding,
    a simple FPN) under ``backbone.``, and the backbone itself for what is left of it
    (position embedding, downsample layers, output norms); heads and necks stay in the root.
    A model without ``.backbone`` is described itself."""
    backbone = getattr(model, 'backbone', None)
    root, prefix = (model, '') if backbone is None else (backbone, 'backbone.')
    description = describe(root)
    blocks = [prefix + n for n in description.units()]
    if not blocks:
        print_log(f'FSDP: no blocks found in {description.name} (no description registered '
                  'for it names them): its parameters form one unit, without per-block '
                  'sharding. Register a description (flora_mm.models.register_description) or '
                  'set model_wrapper_cfg.units.', logger='current', level=logging.WARNING)
    return blocks + (['backbone'] if backbone is not None else [])


def shard_units(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the submodules that become FSDP units, deepest first (fully_shard's order):
    those matching ``patterns`` (``re.search``), or by default ``described_units``."""
    if patterns is None:
        names = described_units(model)
    else:
        compiled = [re.compile(p) for p in patterns]
        names = [n for n, _ in model.named_modules() if n and any(c.search(n) for c in compiled)]
    # a unit inside another unit is fine (bottom-up), but keep each name once
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: -n.count('.'))


def check_unit_grad_dtypes(model: nn.Module, unit_names: Sequence[str],
                           param_dtype: torch.dtype | None = None) -> None:
    """Fail early, naming the unit, where FSDP2 would fail in the first backward: the trainable
    parameters of one unit (deepest enclosing unit; the rest is the root) must produce one
    gradient dtype (their own dtype, or ``param_dtype`` when the unit computes in it)."""
    owner: dict[str, set] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        unit = next((u for u in unit_names if name.startswith(u + '.')), '')
        dtype = param_dtype if (param_dtype is not None and unit) else param.dtype
        owner.setdefault(unit, set()).add(dtype)
    mixed = {u or '<root>': sorted(str(d) for d in ds) for u, ds in owner.items() if len(ds) > 1}
    if mixed:
        raise ValueError(f'FSDP: trainable parameters of mixed dtypes in one unit {mixed}: FSDP2 '
                         'reduces one gradient dtype per unit. Add the submodules of the other '
                         'dtype as their own units (model_wrapper_cfg.units), or store them in '
                         'one dtype and compute in bf16 with param_dtype=\'bfloat16\'')


def _release_base_layer_params(model: nn.Module) -> None:
    """Adapter layers keep their original base layer (unregistered) for its op and config;
    it still references the full-size W0. FSDP2 swaps the registered parameters only, so that
    reference would keep a full unsharded copy of every adapted weight alive on every rank.
    The base layer's op always gets the weight passed in (``AdapterLayer.base_op``), so its own
    entries are dropped; ``remove_adapters`` puts parameters back when unwrapping."""
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            base = module.base_layer
            for name in list(base._parameters):
                base._parameters[name] = None


@torch.no_grad()
def _sync_from_rank0(model: nn.Module) -> None:
    """Broadcast every parameter and buffer from rank 0, as DDP does when it wraps."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def shard_model(model: nn.Module, *, units: Sequence[str] | None = None,
                activation_checkpointing: bool = False,
                param_dtype: str | torch.dtype | None = None,
                reduce_dtype: str | torch.dtype | None = 'float32',
                reshard_after_forward: bool = True, sync_module_states: bool = True,
                device_type: str | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (the process group must exist) and return it.

    ``param_dtype=None`` keeps every parameter's own dtype for compute (a bf16 base with fp32
    adapters stays so, as in the unsharded run); ``'bfloat16'`` makes the units (the blocks)
    compute in bf16 while the sharded parameters, gradients after reduction (``reduce_dtype``)
    and optimizer states stay in their storage dtype (fp32 master weights for Full
    fine-tuning); the root (heads, necks, embeddings) always computes in its storage dtype.
    ``activation_checkpointing``: torch's composable, non-reentrant checkpoint per innermost
    unit (the blocks; adapters inside a frozen block still get gradients); the backbones' own
    ``with_cp`` does the same per block, so turn on one of the two. With it, the backbones stop
    rebuilding adapter inputs themselves (``recompute_adapter_inputs``): the checkpoint
    recomputes the whole block anyway.
    """
    from torch.distributed._composable import checkpoint as composable_checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError('shard_model needs an initialised process group (launch with '
                           'torchrun / tools/dist_train.sh and --launcher pytorch)')
    if device_type is None:
        device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp_policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype),
                                     reduce_dtype=_dtype(reduce_dtype))
    if sync_module_states:
        _sync_from_rank0(model)
    _release_base_layer_params(model)
    names = shard_units(model, units)
    if not names:
        raise ValueError(f'FSDP: no submodule matches the unit patterns {list(units or [])}; '
                         'every parameter would sit in one unit (no memory saving)')
    check_unit_grad_dtypes(model, names, _dtype(param_dtype))
    if activation_checkpointing:
        # the lean blocks' saved-tensor hooks would sit inside the checkpointed region and keep
        # their sources alive there: what the backbones do under their own with_cp
        for module in model.modules():
            if hasattr(module, 'recompute_adapter_inputs'):
                module.recompute_adapter_inputs = False
    # outermost units hand their output to the root, which computes in its storage dtype:
    # with a low-precision param_dtype their outputs go back to fp32
    outer_policy = mp_policy
    if mp_policy.param_dtype is not None:
        outer_policy = MixedPrecisionPolicy(param_dtype=mp_policy.param_dtype,
                                            reduce_dtype=mp_policy.reduce_dtype,
                                            output_dtype=torch.float32)
    for name in names:
        unit = model.get_submodule(name)
        outermost = not any(name.startswith(other + '.') for other in names)
        innermost = not any(other.startswith(name + '.') for other in names)
        if activation_checkpointing and innermost:  # one checkpoint level: the blocks
            composable_checkpoint(unit)
        fully_shard(unit, mesh=mesh, mp_policy=outer_policy if outermost else mp_policy,
                    reshard_after_forward=reshard_after_forward)
    # the root (heads, necks, embeddings) keeps its storage dtype: only the units compute in
    # ``param_dtype``, as InternVL runs a bf16 trunk under an fp32 head
    fully_shard(model, mesh=mesh,
                mp_policy=MixedPrecisionPolicy(reduce_dtype=_dtype(reduce_dtype)))
    return model


def check_meta_loadable(model: nn.Module) -> None:
    """The sharded start reads pretrained files through flora_mm's loaders only (the backbones'
    ``load_pretrained``: key maps, conversions, safety rules); a module asking mmengine's
    ``PretrainedInit`` would load into nothing. Raise naming it."""
    for name, module in model.named_modules():
        pretrained, _ = pretrained_cfg(getattr(module, 'init_cfg', None))
        if pretrained is not None and not hasattr(module, 'load_pretrained'):
            raise ValueError(
                f'FSDP meta_init: {name or type(module).__name__} ({type(module).__name__}) '
                "loads init_cfg=dict(type='Pretrained') through mmengine, which cannot fill a "
                'model built on the meta device. Use a flora_mm backbone (PEFTBackbone / '
                "InternViT / ConvNeXtV2) or set model_wrapper_cfg.meta_init=False")


def _start_values(model: nn.Module, seed: int,
                  checkpoint_follows: bool = False) -> dict[str, torch.Tensor]:
    """Rank 0 of the sharded start: the complete state of ``model`` (on the meta device) as
    full CPU tensors: the pretrained files read by the backbones' own loaders (same key maps,
    checks and errors as the unsharded start; the loads into the meta model are no-ops and
    are captured instead), the rest by the seed rule, buffers as built."""
    with capture_pretrained() as captured:
        for module in model.modules():
            # a PEFTBackbone built with load_pretrained=False (tools/test.py: the checkpoint
            # under test provides every weight) reads no file, as unsharded
            if (hasattr(module, 'load_pretrained') and not getattr(module, 'is_init', False)
                    and getattr(module, '_flora_load_pretrained', True)
                    and pretrained_cfg(getattr(module, 'init_cfg', None))[0] is not None):
                init_weights_from_cfg(module)
    names = {id(m): n for n, m in model.named_modules()}
    values: dict[str, torch.Tensor] = {}
    for module, tensors in captured:
        prefix = f'{names[id(module)]}.' if names[id(module)] else ''
        values.update((prefix + k, v) for k, v in tensors.items())
    seeded, unwritten = seeded_init_values(model, seed, set(values), values.__getitem__)
    values.update(seeded)
    state = model.state_dict(keep_vars=True)
    params = {n for n, _ in model.named_parameters()}
    uninitialised = [k for k in unwritten if k in params]
    if uninitialised and checkpoint_follows:
        print_log(f'FSDP meta_init: {len(uninitialised)} parameter(s) start at zero until the '
                  f'checkpoint is loaded (no pretrained file fills them; e.g. '
                  f'{uninitialised[:3]})', logger='current')
        for key in uninitialised:
            values[key] = torch.zeros(tuple(state[key].shape), dtype=state[key].dtype)
        unwritten = [k for k in unwritten if k not in params]
    elif uninitialised:
        raise ValueError(
            f'FSDP meta_init: {len(uninitialised)} parameter(s) get no value: no pretrained '
            f'file fills them and their module has no initialiser (reset_parameters, '
            f'init_weights, the backbone\'s init_new_module): {uninitialised[:8]}. Load them '
            'from a pretrained file, or set model_wrapper_cfg.meta_init=False')
    for key in unwritten:  # buffers built on the CPU (meta_parameters): their built values
        values[key] = state[key].detach()
    return values


def meta_start(model: nn.Module, seed: int | None, checkpoint_follows: bool = False,
               **shard_options) -> nn.Module:
    """The sharded start of a model whose parameters are on the meta device
    (``flora_mm.models.meta.meta_parameters``): no rank ever holds the whole model.

    Order (torchtitan's, torch's FSDP2 docs): rank 0 computes the start values one source at a
    time (:func:`_start_values`: pretrained files + the seed rule; while the model is still
    meta, because broadcasting into meta tensors fails and the rule needs whole modules),
    ``fully_shard`` per unit on the meta parameters, ``to_empty`` allocates this rank's shards
    (uninitialised memory, buffers included), the buffers built on the CPU are copied back
    (non-persistent ones are in no state dict), then ``set_model_state_dict(...,
    broadcast_from_rank0=True)`` sends every tensor from rank 0 and each rank keeps its shard.
    An error on rank 0 (a bad pretrained file) is raised on every rank.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    if seed is None:
        raise ValueError('FSDP meta_init needs the run seed (init_seed) for the seed rule')
    check_meta_loadable(model)
    values, error = {}, None
    if get_rank() == 0:
        try:
            values = _start_values(model, seed, checkpoint_follows)
        except Exception as err:  # noqa: BLE001 (re-raised below, and named on every rank)
            error = err
    message = [None if error is None else f'{type(error).__name__}: {error}']
    broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f'FSDP meta_init: rank 0 could not prepare the start: {message[0]}')
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard_model(model, sync_module_states=False, **shard_options)
    device = (torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device('cpu'))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
    set_model_state_dict(model, values,
                         options=_options(full_state_dict=True, broadcast_from_rank0=True))
    del values
    for module in model.modules():  # initialised: the Runner must not run init_weights again
        if hasattr(module, '_is_init'):
            module._is_init = True
    return model


@MODEL_WRAPPERS.register_module()
class FullyShardedModel(nn.Module):
    """mmengine model wrapper around an FSDP2-sharded model (``model_wrapper_cfg``).

    Same interface as ``MMDistributedDataParallel``: ``module`` is the (sharded) model itself,
    so hooks, checkpoints and state-dict keys see the plain model's names.

    Args:
        module: the model the Runner built (whole, on this rank's device).
        units, activation_checkpointing, param_dtype, reduce_dtype, reshard_after_forward:
            see :func:`shard_model`.
        init_before_sharding: run ``module.init_weights()`` while the model is whole (mmengine
            would run it after wrapping, on shards); :class:`FSDPRunner` skips its own call.
        meta_init: the sharded start (:class:`FSDPRunner` builds the model's parameters on the
            meta device, see :func:`meta_start`); a module that arrives with real parameters
            takes the gathered path (init whole, broadcast, shard) whatever this says.
        init_seed: the run seed of the seed rule (``flora_mm/engine/seeded_init.py``);
            :class:`FSDPRunner` passes its own. None: no re-initialisation (the model's
            ``init_weights()`` values; the meta-device start needs a seed).
        checkpoint_follows: a checkpoint is loaded into the model right after (``load_from``,
            ``tools/test.py``): the meta-device start zero-fills parameters that nothing else
            initialises (the backbone of a test run, which reads no pretrained file) instead
            of refusing them.
        save_format: how :class:`FSDPRunner` writes checkpoints of this model: ``'full'``
            (one ordinary mmengine file: every rank gathers, rank 0 writes) or ``'dcp'`` (a
            ``torch.distributed.checkpoint`` directory with the mmengine name, ``iter_N.pth/``:
            each rank writes its own shards, no rank holds the whole state). Loading reads
            either, on any number of processes.
    """

    def __init__(self, module: nn.Module, units: Sequence[str] | None = None,
                 activation_checkpointing: bool = False,
                 param_dtype: str | None = None, reduce_dtype: str | None = 'float32',
                 reshard_after_forward: bool = True, init_before_sharding: bool = True,
                 meta_init: bool = False, init_seed: int | None = None,
                 checkpoint_follows: bool = False, save_format: str = 'full') -> None:
        super().__init__()
        self.save_format = check_save_format(save_format)
        options = dict(units=units, activation_checkpointing=activation_checkpointing,
                       param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                       reshard_after_forward=reshard_after_forward)
        self.meta_init = any(p.is_meta for p in module.parameters())
        if self.meta_init:
            if not init_before_sharding:
                raise ValueError('FSDP: a model built on the meta device must be initialised '
                                 'by the wrapper (init_before_sharding=True)')
            self.module = meta_start(module, init_seed, checkpoint_follows=checkpoint_follows,
                                     **options)
        else:
            if init_before_sharding and hasattr(module, 'init_weights'):
                module.init_weights()
                apply_seeded_init(module, init_seed)
            self.module = shard_model(module, **options)
        self.units = shard_units(module, units)

    # -- mmengine's model interface ----------------------------------------------------------
    def train_step(self, data: dict | tuple | list, optim_wrapper: OptimWrapper) -> dict:
        with optim_wrapper.optim_context(self):
            data = self.module.data_preprocessor(data, training=True)
            losses = self._run_forward(data, mode='loss')
        parsed_loss, log_vars = self.module.parse_losses(losses)
        optim_wrapper.update_params(parsed_loss)
        return log_vars

    def val_step(self, data: dict | tuple | list) -> list:
        return self.module.val_step(data)

    def test_step(self, data: dict | tuple | list) -> list:
        return self.module.test_step(data)

    def _run_forward(self, data: dict | tuple | list, mode: str) -> Any:
        if isinstance(data, dict):
            return self.module(**data, mode=mode)
        if isinstance(data, (list, tuple)):
            return self.module(*data, mode=mode)
        raise TypeError(f'Output of data_preprocessor should be list, tuple or dict, '
                        f'but got {type(data)}')

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation (``accumulative_counts``): no reduce-scatter until the last
        micro-step, as DDP's ``no_sync``."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------- state dicts
def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on rank 0 (CPU), {} on the other ranks; every rank must call."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The complete optimizer state keyed by parameter names, on rank 0 (CPU)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=_options(full_state_dict=True, cpu_offload=True))


def _wraps_fully_sharded(model_wrapper_cfg) -> bool:
    return (isinstance(model_wrapper_cfg, dict)
            and str(model_wrapper_cfg.get('type', '')).endswith('FullyShardedModel'))


def _reads_at_construction(cfg: Any) -> list[str]:
    """Config keys that make a module read weights while it is built (OpenMMLab's
    ``pretrained=PATH``, timm's ``pretrained=True``): a meta-device build would drop them."""
    found = []
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == 'pretrained' and value:
                found.append(f'pretrained={value!r}')
            found += _reads_at_construction(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            found += _reads_at_construction(value)
    return found


HOST_MEMORY_FILE = 'host_memory_rank{rank}.json'


def local_state_bytes(model: nn.Module,
                      optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of the model's training state: ``params`` (its shards of every
    parameter, padding included: what ``fully_shard`` allocated), ``grads`` (the same for the
    trainable ones: the sharded gradients between backward and the optimizer step), and
    ``optimizer`` (the optimizer's tensor states, its shards; 0 before the first step)."""
    from ..dist import is_sharded

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if is_sharded(t) else t
        return local.untyped_storage().nbytes() if local.numel() else 0

    params = list(model.parameters())
    out = dict(params=sum(nbytes(p) for p in params),
               grads=sum(nbytes(p) for p in params if p.requires_grad), optimizer=0)
    if optimizer is not None:
        out['optimizer'] = sum(nbytes(v) for state in optimizer.state.values()
                               for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return out


def _host_memory_phase(phase: str, before: str):
    """Record the peak host RSS of a sharded run around ``save_checkpoint(out_dir, filename,
    ...)``: the peak since the previous record as ``before`` on entry, the save's own as
    ``phase`` (with the checkpoint's file name) on exit (see ``FSDPRunner._host_phase``;
    nothing without sharding)."""
    def decorate(method):
        @functools.wraps(method)
        def wrapped(self, out_dir, filename, *args, **kwargs):
            self._host_phase(before)
            result = method(self, out_dir, filename, *args, **kwargs)
            self._host_phase(phase, checkpoint=filename)
            return result
        return wrapped
    return decorate


@RUNNERS.register_module()
class FSDPRunner(FLoRARunner):
    """mmengine's Runner with checkpoint I/O for FSDP2-sharded models (see module docstring).

    Without sharding (no launcher, or another wrapper) it is ``FLoRARunner`` (mmengine's Runner
    + the seed rule) unchanged. With ``model_wrapper_cfg.meta_init=True`` (the default of
    configs/_base_/fsdp.py) a distributed run builds the model's parameters on the meta device
    and ``FullyShardedModel`` starts it shard by shard (``meta_start``).
    """

    def __init__(self, *args, **kwargs) -> None:
        # a wrong save_format is named before anything is built (and in a run without a
        # launcher, which does not wrap the model, too)
        # (mmengine's from_cfg passes the wrapper config inside cfg)
        wrapper_cfg = (kwargs.get('model_wrapper_cfg')
                       or (kwargs.get('cfg') or {}).get('model_wrapper_cfg'))
        if _wraps_fully_sharded(wrapper_cfg):
            check_save_format(wrapper_cfg.get('save_format', 'full'))
        super().__init__(*args, **kwargs)

    def _meta_init_wanted(self) -> bool:
        cfg = self.cfg.get('model_wrapper_cfg')
        return (self.distributed and _wraps_fully_sharded(cfg)
                and bool(cfg.get('meta_init', False)))

    def build_model(self, model):
        if not (isinstance(model, dict) and self._meta_init_wanted()):
            return super().build_model(model)
        reads = _reads_at_construction(model)
        if reads:
            raise ValueError(f'FSDP meta_init: the model config reads weights while it is '
                             f'built ({", ".join(reads)}), which a meta-device build would '
                             "drop. Use init_cfg=dict(type='Pretrained', checkpoint=...) on a "
                             'flora_mm backbone, or set model_wrapper_cfg.meta_init=False')
        with meta_parameters():
            built = super().build_model(model)
        self.logger.info('FSDP meta_init: model parameters built on the meta device')
        return built

    def _init_model_weights(self) -> None:
        if is_fully_sharded(self.model):
            # FullyShardedModel initialised the model before / while sharding
            reseed_after_init(self)
            return
        super()._init_model_weights()

    def wrap_model(self, model_wrapper_cfg, model):
        """A leaf config's bf16 AMP (``AmpOptimWrapper(dtype='bfloat16')``) becomes FSDP's bf16
        compute of the blocks (``param_dtype``) unless the wrapper config sets one, so the
        sharded run computes in the precision the leaf config asked for. (fp16 AMP is not
        carried over: without its loss scaler fp16 gradients underflow; the run computes in
        the parameters' own dtype then.)"""
        if _wraps_fully_sharded(model_wrapper_cfg) and self.distributed:
            model_wrapper_cfg = copy.deepcopy(model_wrapper_cfg)
            model_wrapper_cfg.setdefault('init_seed', run_init_seed(self))  # the seed rule
        if (_wraps_fully_sharded(model_wrapper_cfg)
                and model_wrapper_cfg.get('param_dtype') is None):
            optim = self.cfg.get('optim_wrapper', None) or {}
            if (optim.get('type') == 'AmpOptimWrapper'
                    and str(optim.get('dtype')).replace('torch.', '') == 'bfloat16'):
                model_wrapper_cfg = copy.deepcopy(model_wrapper_cfg)
                model_wrapper_cfg['param_dtype'] = 'bfloat16'
                self.logger.info('FSDP: the config\'s bf16 AMP -> FSDP bf16 compute of the '
                                 'blocks (param_dtype=bfloat16)')
        if not any(p.is_meta for p in model.parameters()):
            wrapped = super().wrap_model(model_wrapper_cfg, model)
        else:
            # the meta-device start: mmengine's wrap_model would first move the model to the
            # device (``model.to``), which cannot copy meta tensors; FullyShardedModel
            # allocates the shards on the device itself (to_empty). A checkpoint loaded next
            # (load_from, tools/test.py) may provide what no pretrained file does.
            model_wrapper_cfg.setdefault('checkpoint_follows', bool(self._load_from))
            sync_bn = self.cfg.get('sync_bn', None)
            if sync_bn is not None:
                from mmengine.model import convert_sync_batchnorm
                model = convert_sync_batchnorm(model, sync_bn)
            wrapped = MODEL_WRAPPERS.build(model_wrapper_cfg, default_args=dict(module=model))
        if is_fully_sharded(wrapped):
            self.host_memory = HostMemoryRecorder(reset=False)
            start = 'meta-device' if wrapped.meta_init else 'gathered'
            # peak since the process started: imports, build, shard, init, pretrained load
            entry = self._host_phase('start', start=start, rank=get_rank(),
                                     world_size=self.world_size,
                                     shard_bytes=local_state_bytes(wrapped.module))
            self.logger.info(f'FSDP: model started in shards ({start} start); peak host RSS '
                             f'of rank {get_rank()} so far {entry["peak_rss_mib"]:.0f} MiB '
                             f'(phases: {self.host_memory_path})')
        return wrapped

    # -- host memory per phase ------------------------------------------------------------------
    @property
    def host_memory_path(self) -> str:
        """``<work_dir>/<timestamp>/host_memory_rank<R>.json``: this rank's peak host RSS per
        phase of a sharded run (``start``; ``setup`` = the rest of the Runner's setup up to the
        checkpoint load, ``load`` = load_from / resume when one is loaded; per checkpoint save
        ``train`` = the iterations since the previous record, and ``save``), rewritten after
        each phase."""
        return os.path.join(self.log_dir, HOST_MEMORY_FILE.format(rank=get_rank()))

    def _host_phase(self, phase: str, **extra) -> dict | None:
        """Record the peak since the previous phase (sharded runs only; cheap: two /proc
        reads, a write to clear_refs and a small JSON file)."""
        recorder = getattr(self, 'host_memory', None)
        if recorder is None:
            return None
        if phase == 'save':
            optimizer = getattr(getattr(self, 'optim_wrapper', None), 'optimizer', None)
            extra['shard_bytes'] = local_state_bytes(self.model.module, optimizer)
        entry = recorder.record(phase, **extra)
        recorder.save(self.host_memory_path)
        return entry

    def load_or_resume(self) -> None:
        loaded = self._has_loaded
        self._host_phase('setup')
        super().load_or_resume()
        if self._has_loaded and not loaded:
            self._host_phase('load')

    def build_optim_wrapper(self, optim_wrapper):
        """A sharded model does its mixed precision in FSDP (``MixedPrecisionPolicy``): an
        ``AmpOptimWrapper`` from the leaf config becomes a plain ``OptimWrapper`` with the same
        optimizer, clipping and accumulation (AMP's autocast + GradScaler would only add casts,
        and mmengine's AMP wrapper refuses the CPU)."""
        if (is_fully_sharded(self.model) and isinstance(optim_wrapper, dict)
                and optim_wrapper.get('type') == 'AmpOptimWrapper'):
            optim_wrapper = copy.deepcopy(optim_wrapper)
            optim_wrapper['type'] = 'OptimWrapper'
            for key in ('loss_scale', 'dtype', 'use_fsdp'):
                optim_wrapper.pop(key, None)
            self.logger.info('FSDP: AmpOptimWrapper -> OptimWrapper (FSDP does the mixed '
                             'precision)')
        return super().build_optim_wrapper(optim_wrapper)

    # -- save -----------------------------------------------------------------------------------
    @_host_memory_phase('save', before='train')
    def save_checkpoint(self, out_dir: str, filename: str, file_client_args: dict | None = None,
                        save_optimizer: bool = True, save_param_scheduler: bool = True,
                        meta: dict | None = None, by_epoch: bool = True,
                        backend_args: dict | None = None) -> None:
        if not is_fully_sharded(self.model):
            return super().save_checkpoint(out_dir, filename, file_client_args, save_optimizer,
                                           save_param_scheduler, meta, by_epoch, backend_args)
        if getattr(self.model, 'save_format', 'full') == 'dcp':
            return self._save_dcp(out_dir, filename, file_client_args, save_optimizer,
                                  save_param_scheduler, meta, by_epoch, backend_args)
        model = self.model.module
        state_dict = full_model_state_dict(model)  # collective: every rank
        optim_state = None
        if save_optimizer:
            self._check_optim_wrapper()
            optim_state = full_optimizer_state_dict(model, self.optim_wrapper.optimizer)
        checkpoint, filepath = self._checkpoint_dict(out_dir, filename, state_dict, optim_state,
                                                     save_param_scheduler, meta, by_epoch,
                                                     backend_args)
        # every rank runs the hooks (a hook may gather sharded tensors, e.g. FLoRAHook's adapter
        # file); the other ranks' dict has the metadata but no tensors; rank 0 writes
        self.call_hook('before_save_checkpoint', checkpoint=checkpoint)
        if is_main_process():
            save_checkpoint(checkpoint, filepath, backend_args=backend_args)
        dist.barrier()

    def _check_optim_wrapper(self) -> None:
        if type(self.optim_wrapper) is not OptimWrapper:
            raise TypeError('sharded checkpoints support a plain OptimWrapper (FSDP2 does '
                            'the mixed precision; no AmpOptimWrapper / OptimWrapperDict), '
                            f'got {type(self.optim_wrapper).__name__}')

    def _save_dcp(self, out_dir, filename, file_client_args, save_optimizer,
                  save_param_scheduler, meta, by_epoch, backend_args) -> None:
        """``save_format='dcp'``: every rank writes its own shards of the model and optimizer
        (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
        ``full_state_dict=False``: DTensors, nothing gathered; the optimizer state keyed by
        parameter names) into a DCP directory with the checkpoint's name, rank 0 adds the
        rest (meta, message hub, schedulers, the hooks' entries: random state, PEFT methods)
        as ``extra_state.pth`` and renames the directory into place
        (``flora_mm.checkpoint.write_dcp_checkpoint``). The hooks run on every rank and see
        the sharded tensors (DTensors: a check such as FiniteCheckHook's ``isfinite().all()``
        is a collective, so every rank reaches the same verdict); if a hook fails on any rank
        nothing is written, on every rank."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        _check_local_storage(out_dir, file_client_args, backend_args)
        model = self.model.module
        state_dict = get_model_state_dict(model, options=_options(full_state_dict=False))
        optim_state = None
        if save_optimizer:
            self._check_optim_wrapper()
            optim_state = get_optimizer_state_dict(model, self.optim_wrapper.optimizer,
                                                   options=_options(full_state_dict=False))
        checkpoint, filepath = self._checkpoint_dict(out_dir, filename, state_dict, optim_state,
                                                     save_param_scheduler, meta, by_epoch,
                                                     backend_args)
        checkpoint['meta']['sharded']['format'] = 'dcp'
        error = None
        try:
            self.call_hook('before_save_checkpoint', checkpoint=checkpoint)
        except Exception as err:  # noqa: BLE001 (re-raised below, after the ranks agree)
            error = err
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, None if error is None
                               else f'{type(error).__name__}: {error}')
        failed = [(rank, message) for rank, message in enumerate(failures) if message]
        if failed:
            if is_main_process():
                discard_companions(filepath)  # the adapter files staged for it
            if error is not None:
                raise error
            raise RuntimeError(f'sharded checkpoint {filepath} not written: rank '
                               f'{failed[0][0]} failed before saving: {failed[0][1]}')
        tensors = {MODEL_KEY: checkpoint.pop('state_dict')}
        optim_state = checkpoint.pop('optimizer', None)
        if optim_state is not None:
            tensors[OPTIM_KEY] = {'state': optim_state['state']}
            checkpoint[PARAM_GROUPS_KEY] = optim_state['param_groups']
        write_dcp_checkpoint(filepath, tensors, checkpoint, on_commit=commit_companions,
                             on_failure=discard_companions)
        self.logger.info(f'FSDP: sharded checkpoint (DCP) {filepath}, '
                         f'{dist.get_world_size()} shard files')

    def _checkpoint_dict(self, out_dir, filename, state_dict, optim_state, save_param_scheduler,
                         meta, by_epoch, backend_args) -> tuple[dict, str]:
        """mmengine's Runner.save_checkpoint layout, with the gathered states."""
        import mmengine
        from mmengine.fileio import join_path
        meta = dict(meta or {})
        if by_epoch:
            meta.setdefault('epoch', self.epoch + 1)
            meta.setdefault('iter', self.iter)
        else:
            meta.setdefault('epoch', self.epoch)
            meta.setdefault('iter', self.iter + 1)
        filepath = join_path(out_dir, filename, backend_args=backend_args)
        meta.update(cfg=self.cfg.pretty_text, seed=self.seed,
                    experiment_name=self.experiment_name,
                    time=time.strftime('%Y%m%d_%H%M%S', time.localtime()),
                    mmengine_version=mmengine.__version__,
                    sharded=dict(strategy='fsdp2', world_size=self.world_size,
                                 optimizer_keys='parameter names'))
        if hasattr(self.train_dataloader.dataset, 'metainfo'):
            meta.update(dataset_meta=self.train_dataloader.dataset.metainfo)
        checkpoint = dict(meta=meta, state_dict=state_dict,
                          message_hub=apply_to(self.message_hub.state_dict(),
                                               lambda x: hasattr(x, 'cpu'), lambda x: x.cpu()))
        if optim_state is not None:
            checkpoint['optimizer'] = optim_state
        if save_param_scheduler and self.param_schedulers is not None:
            if isinstance(self.param_schedulers, dict):
                checkpoint['param_schedulers'] = {
                    name: [s.state_dict() for s in schedulers]
                    for name, schedulers in self.param_schedulers.items()}
            else:
                checkpoint['param_schedulers'] = [s.state_dict() for s in self.param_schedulers]
        return checkpoint, filepath

    # -- load -----------------------------------------------------------------------------------
    def _check_keys(self, source: str, missing: list, unexpected: list, strict: bool) -> None:
        """A checkpoint's keys against the model's, for both save formats: an error under
        ``strict``, else a warning naming a few (what mmengine's loader does)."""
        if strict and (missing or unexpected):
            raise KeyError(f'{source}: missing keys {missing[:10]}, unexpected keys '
                           f'{unexpected[:10]}')
        if missing or unexpected:
            self.logger.warning(f'{source}: {len(missing)} missing keys (e.g. {missing[:5]}), '
                                f'{len(unexpected)} unexpected (e.g. {unexpected[:5]}): not '
                                'loaded')

    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):  # noqa: B006 (mmengine's)
        if not is_fully_sharded(self.model):
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        self._fsdp_dcp_path = None
        if is_dcp_checkpoint(osp.expanduser(str(filename))):
            return self._load_dcp(filename, strict, revise_keys)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        # rank 0 reads the file; the small parts go to every rank, the tensors are broadcast
        # into the shards by torch (one tensor at a time)
        checkpoint = _load_checkpoint(filename, map_location='cpu') if get_rank() == 0 else {}
        small = [None]
        if get_rank() == 0:
            tensors = checkpoint.get('state_dict', {})
            small = [{k: v for k, v in checkpoint.items() if k not in ('state_dict', 'optimizer')}
                     | {'_has_optimizer': 'optimizer' in checkpoint,
                        '_shapes': {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()
                                    if torch.is_tensor(v)}}]
        broadcast_object_list(small, src=0)
        self._fsdp_has_optimizer = small[0].pop('_has_optimizer')
        shapes = small[0].pop('_shapes')
        if get_rank() != 0:
            # the other ranks' hooks see the file's keys, shapes and dtypes (meta tensors)
            checkpoint = dict(small[0])
            checkpoint['state_dict'] = {k: torch.empty(shape, dtype=dtype, device='meta')
                                        for k, (shape, dtype) in shapes.items()}
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        state_dict = checkpoint.get('state_dict', checkpoint) if get_rank() == 0 else {}
        for pattern, repl in revise_keys:
            state_dict = {re.sub(pattern, repl, k): v for k, v in state_dict.items()}
        model = self.model.module
        if get_rank() == 0:
            expected = set(full_key_names(model))
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            self._check_keys(filename, missing, unexpected, strict)
            state_dict = {k: v for k, v in state_dict.items() if k in expected}
            for key in missing:  # torch's broadcast expects every key: keep current values
                state_dict[key] = None
        state_dict = _fill_missing_with_current(model, state_dict)
        set_model_state_dict(model, state_dict,
                             options=_options(full_state_dict=True, broadcast_from_rank0=True,
                                              strict=False))
        self._fsdp_optimizer_state = checkpoint.pop('optimizer', None)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename} into the sharded model')
        return checkpoint

    def _load_dcp(self, filename: str, strict: bool, revise_keys: list) -> dict:
        """A DCP checkpoint directory into the sharded model: rank 0 checks that it is complete
        (every shard file there, ``.metadata`` safe) and reads its small part, every rank
        gets that; then every rank reads the chunks its own shards need (``dcp.load``
        reshards: the directory may come from any number of processes) into the sharded
        state dict, which ``set_model_state_dict`` loads. Nothing is gathered."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             set_model_state_dict)
        path = osp.abspath(osp.expanduser(str(filename)))
        info, error = [None], None
        if get_rank() == 0:
            try:
                check_dcp_checkpoint(path)
                extra = load_dcp_extra(path)
                info = [dict(extra=extra, specs=dcp_tensor_specs(path, MODEL_KEY),
                             has_optimizer=(PARAM_GROUPS_KEY in extra or any(
                                 p[0] == OPTIM_KEY for p in dcp_key_paths(path))))]
            except Exception as err:  # noqa: BLE001 (raised below, named on every rank)
                error = err
                info = [dict(error=f'{type(err).__name__}: {err}')]
        broadcast_object_list(info, src=0)
        if error is not None:
            raise error
        if 'error' in info[0]:
            raise CheckpointError(f'rank 0 could not read {path}: {info[0]["error"]}')
        extra, specs = info[0]['extra'], info[0]['specs']
        self._fsdp_has_optimizer = info[0]['has_optimizer']
        checkpoint = dict(extra)
        checkpoint.pop(PARAM_GROUPS_KEY, None)
        self._fsdp_param_groups = extra.get(PARAM_GROUPS_KEY)
        # the hooks see the file's keys, shapes and dtypes (meta tensors), as on the ranks > 0
        # of the gathered format
        checkpoint['state_dict'] = {k: torch.empty(shape, dtype=dtype, device='meta')
                                    for k, (shape, dtype) in specs.items()}
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module
        current = get_model_state_dict(model, options=_options(full_state_dict=False))
        names = {}  # name in the model -> name in the checkpoint
        for key in specs:
            new = key
            for pattern, repl in revise_keys:
                new = re.sub(pattern, repl, new)
            names[new] = key
        missing = sorted(set(current) - set(names))
        unexpected = sorted(set(names) - set(current))
        self._check_keys(path, missing, unexpected, strict)
        wanted = {names[k]: v for k, v in current.items() if k in names}
        load_dcp_into(path, {MODEL_KEY: wanted})
        set_model_state_dict(model, {k: wanted[names[k]] for k in current if k in names},
                             options=_options(full_state_dict=False, strict=False))
        self._fsdp_optimizer_state = None
        self._fsdp_dcp_path = path
        self._has_loaded = True
        self.logger.info(f'Load sharded checkpoint (DCP) from {path} into the sharded model '
                         f'(world size {dist.get_world_size()})')
        return checkpoint

    def _resume_dcp_optimizer(self, path: str) -> None:
        """The optimizer state of the DCP checkpoint ``path`` into this rank's shards: the
        sharded optimizer state dict (``get_optimizer_state_dict(full_state_dict=False)``,
        which first creates the state with a zero-lr step) is filled by ``dcp.load`` and
        loaded with the checkpoint's param_groups (parameter names) by
        ``set_optimizer_state_dict``. Parameters without state in the checkpoint (frozen ones:
        the optimizer never stepped them) get none."""
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        model, optimizer = self.model.module, self.optim_wrapper.optimizer
        state = get_optimizer_state_dict(model, optimizer,
                                         options=_options(full_state_dict=False))
        saved = dcp_key_paths(path)
        wanted, stateless, other = {}, [], []
        for name, entries in state['state'].items():
            present = [k for k in entries if (OPTIM_KEY, 'state', name, k) in saved]
            if not present:
                stateless.append(name)
            elif len(present) != len(entries):
                other.append(f'{name}: {sorted(entries)} vs saved {sorted(present)}')
            else:
                wanted[name] = entries
        if other:
            raise CheckpointError(f'--resume: the optimizer state in {path} has other entries '
                                  f'than this optimizer ({other[:3]}): another optimizer type?')
        if stateless:  # trainable, but never stepped in the saved run (no gradient yet)
            self.logger.warning(f'{path}: no optimizer state for {len(stateless)} trained '
                                f'parameters (e.g. {stateless[:5]}); they start without one, '
                                'as in the saved run')
        groups = self._fsdp_param_groups
        if not groups:
            raise CheckpointError(f'--resume: {path} has optimizer state but no param_groups '
                                  'in its extra_state.pth')
        load_dcp_into(path, {OPTIM_KEY: {'state': wanted}})
        set_optimizer_state_dict(model, optimizer, dict(state=wanted, param_groups=groups),
                                 options=_options(full_state_dict=False, strict=False))

    def resume(self, filename: str, resume_optimizer: bool = True,
               resume_param_scheduler: bool = True, map_location: Any = 'default') -> None:
        if not is_fully_sharded(self.model):
            return super().resume(filename, resume_optimizer, resume_param_scheduler,
                                  map_location)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        super().resume(filename, resume_optimizer=False,
                       resume_param_scheduler=resume_param_scheduler, map_location='cpu')
        optim_state = getattr(self, '_fsdp_optimizer_state', None)
        self._fsdp_optimizer_state = None
        if resume_optimizer and self._fsdp_has_optimizer:
            self.optim_wrapper = self.build_optim_wrapper(self.optim_wrapper)
            if self._fsdp_dcp_path is not None:
                self._resume_dcp_optimizer(self._fsdp_dcp_path)
                self.logger.info('resumed the sharded optimizer state (DCP)')
                return
            set_optimizer_state_dict(
                self.model.module, self.optim_wrapper.optimizer,
                optim_state if get_rank() == 0 else {},
                options=_options(full_state_dict=True, broadcast_from_rank0=True))
            self.logger.info('resumed the sharded optimizer state')


def _check_local_storage(out_dir: str, file_client_args, backend_args) -> None:
    """DCP directories are written to a local (or mounted) file system."""
    backend = (backend_args or {}).get('backend')
    if (file_client_args or backend not in (None, 'local', ATOMIC_BACKEND)
            or '://' in str(out_dir)):
        raise ValueError(f'save_format=\'dcp\' writes to a local or mounted file system; '
                         f'{out_dir} with backend_args={backend_args!r} / file_client_args='
                         f'{file_client_args!r} is not one (use save_format=\'full\')')


def full_key_names(model: nn.Module) -> list[str]:
    """State-dict keys of the model (names only, no gathering)."""
    return list(model.state_dict().keys())


def _fill_missing_with_current(model: nn.Module, state_dict: dict) -> dict:
    """Keys rank 0 marked None (absent from the file) keep the model's current values:
    gather those few tensors so the broadcast carries them unchanged."""
    current = model.state_dict()
    missing = [None]
    if get_rank() == 0:
        missing = [[k for k, v in state_dict.items() if v is None]]
    broadcast_object_list(missing, src=0)
    gathered = gather_full({k: current[k] for k in missing[0]})
    if get_rank() == 0:
        state_dict = dict(state_dict)
        state_dict.update(gathered)
    return state_dict


def iter_local_numel(model: nn.Module) -> Iterable[tuple[str, int, int]]:
    """(name, elements held on this rank, elements of the whole tensor) per parameter."""
    from ..dist import is_sharded
    for name, param in model.named_parameters():
        local = param.to_local().numel() if is_sharded(param) else param.numel()
        yield name, local, param.numel()
