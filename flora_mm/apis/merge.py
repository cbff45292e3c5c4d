"""Merge trained adapters into the base weights; write a checkpoint vanilla OpenMMLab loads.

The checkpoint is either a full one written by tools/train.py or an adapter-only one written
by FLoRAHook (``*_adapter.safetensors`` + ``.json``; its frozen base weights then come from the
config's pretrained ``init_cfg`` and must match the sidecar's fingerprint). The output holds
``{'state_dict', 'meta'}`` with the adapters merged (W0 + s*dW) and no adapter tensors, only
tensors and plain Python values (torch.load(weights_only=True) reads it), and beside it the
config to load it with: PEFTBackbone replaced by the plain backbone, no FLoRAHook.

A backbone whose description exports it (``flora_mm.models.describe(backbone).export``:
ConvNeXtV2 becomes mmpretrain's ``ConvNeXt``, keys converted) becomes that vanilla class unless
``plain_keys``; others (InternViT, OpenMMLab's own backbones) keep their type. Without flora_mm
in the merged config, flora_mm's layer-decay constructor becomes the package's own for that
backbone (mmdet's / mmseg's ``LearningRateDecayOptimizerConstructor``) or the default one, so
plain OpenMMLab can fine-tune the merged model further. Unless ``check=False``, the written
backbone is run on a random image and compared with the adapted one.
"""
from __future__ import annotations

import copy
import importlib
import logging
import math
import os
import os.path as osp
from collections import OrderedDict
from typing import Any, Optional

import mmengine
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from torch import nn

from ..checkpoint import (CheckpointError, check_finite, check_keys, check_types,
                          load_checkpoint_file, mmengine_checkpoint_globals, state_dict_of,
                          to_plain)
from ..models import Export, describe
from ..models.peft_backbone import without_weights
from ..peft import adapter_layers, injected_roots, remove_adapters
from ..registry import MODELS
from ..peft.io import load_adapter_checkpoint, read_adapter_info
from ..utils import atomic_paths
from .config import load_config
from .model import build_model, is_flora_hook, peft_backbone_cfg

EXPORT_HINT = ('install it (mmpretrain: pip install mmpretrain==1.2.0) or pass --plain-keys '
               "to keep flora_mm's backbone type")


class MergeError(RuntimeError):
    """A user-facing error: bad input files or a checkpoint that does not fit the config."""


# ------------------------------------------------------------------------ loading
def is_adapter_checkpoint(path: str, adapter_flag: bool) -> bool:
    if adapter_flag and not path.endswith('.safetensors'):
        raise MergeError(f'--adapter: {path} is not an adapter-only checkpoint '
                         '(*_adapter.safetensors + .json, written by FLoRAHook)')
    return path.endswith('.safetensors')


def load_full_checkpoint(model: nn.Module, path: str, config: str) -> dict:
    """Load a tools/train.py checkpoint strictly; returns its ``meta``."""
    try:  # weights_only, with the objects of plain mmengine checkpoints allowed (only)
        with mmengine_checkpoint_globals():
            ckpt = load_checkpoint_file(path, map_location='cpu')
        state = state_dict_of(ckpt, path)
        own = model.state_dict()
        check_keys(own, state, path, unexpected_ok=False,
                   cause=f'not trained with {config} (another PEFT method, rank or model size)')
        check_types(own, state, path)
        check_finite(state, path)
    except CheckpointError as err:  # names the file (and the refused object or tensors)
        raise MergeError(str(err)) from None
    model.load_state_dict(state, strict=True)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    return meta if isinstance(meta, dict) else {}


def load_adapter_only(model: nn.Module, path: str, config: str) -> dict:
    """Load FLoRAHook's adapter file into a model whose base weights came from init_cfg."""
    info = read_adapter_info(path)
    try:
        load_adapter_checkpoint(model, path, strict=True)
    except (KeyError, ValueError) as err:
        raise MergeError(f'{path} does not fit {config}: {err}') from err
    return info


def _is_flora_mm(module: Any) -> bool:
    return type(module).__module__.split('.')[0] == 'flora_mm'


# ------------------------------------------------------------------------ verification
def _probe(backbone: nn.Module) -> torch.Tensor:
    """A small random image the backbone accepts (ViTs: 4x4 patches so the FPN can pool)."""
    patch = getattr(getattr(backbone, 'patch_embed', None), 'patch_size', None)
    size = 4 * int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else 64
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    backbone.eval()
    out = backbone(x)
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else [out])]


def verify(ref: list[torch.Tensor], got: list[torch.Tensor], fp32: bool) -> float:
    """Fail if an fp32 backbone's outputs moved more than 1e-3 (relative); for bf16/fp16 a
    merge rounds W0 + dW once more, so only warn above 5e-2."""
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        raise MergeError(f'the written backbone returns {[tuple(t.shape) for t in got]}, the '
                         f'adapted one {[tuple(t.shape) for t in ref]}')
    err = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
              for a, b in zip(ref, got))
    if not math.isfinite(err):  # NaN passes every `>` test
        raise MergeError('verification failed: the backbone outputs are not finite (NaN/Inf)')
    if fp32 and err > 1e-3:
        raise MergeError(f'verification failed: the written backbone differs from the adapted '
                         f'one by {err:.2e} (relative max abs)')
    if err > 5e-2:
        print_log(f'merged backbone differs from the adapted one by {err:.2e} (low precision)',
                  logger='current', level=logging.WARNING)
    return err


def build_exported(export: Export) -> nn.Module:
    """The exported backbone as the written config builds it, loaded strictly."""
    for module in export.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise MergeError(f'cannot import {module} ({err}), which the merged config needs; '
                             f'{EXPORT_HINT}') from err
    model = MODELS.build(copy.deepcopy(export.cfg))
    try:
        model.load_state_dict(export.state, strict=True)
    except RuntimeError as err:
        raise MergeError(f'converted keys do not fit {export.cfg["type"]}: {err}') from err
    return model


# ------------------------------------------------------------------------ output
def dataset_meta(cfg: Config) -> Optional[dict]:
    """The test dataset's METAINFO (plus the config's ``metainfo``), as mmengine stores it in
    checkpoints (the adapter-only file has none); None if it cannot be found."""
    from mmengine.registry import DATASETS
    try:
        ds = cfg.get('test_dataloader', cfg.get('val_dataloader'))['dataset']
        while 'dataset' in ds and 'type' in ds and ds.get('metainfo') is None:
            if ds['type'].split('.')[-1] in ('RepeatDataset', 'ClassBalancedDataset',
                                             'ConcatDataset', 'MultiImageMixDataset'):
                ds = ds['dataset']
            else:
                break
        with DATASETS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
            cls = registry.get(ds['type'])
        meta = copy.deepcopy(dict(getattr(cls, 'METAINFO', {})))
        meta.update(ds.get('metainfo') or {})
        return meta or None
    except Exception:  # noqa: BLE001  (best effort: meta is optional)
        return None


def merged_config(cfg: Config, export: Optional[Export], backbone_cfg: Optional[dict],
                  needs_flora_mm: bool) -> Config:
    """The config for the merged checkpoint: plain backbone, no FLoRAHook, matching imports;
    without flora_mm, the package's own layer-decay constructor (or the default one) in place
    of flora_mm's, so that plain OpenMMLab can fine-tune the merged model further."""
    d = cfg.to_dict()
    if backbone_cfg is not None:
        d['model']['backbone'] = backbone_cfg
    if 'custom_hooks' in d:
        d['custom_hooks'] = [h for h in d['custom_hooks'] or [] if not is_flora_hook(h)]
    custom = d.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    imports = custom.get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    imports = [i for i in imports if i != 'flora_mm' and not i.startswith('flora_mm.')]
    if needs_flora_mm:
        imports.insert(0, 'flora_mm')
    for module in (export.imports if export is not None else []):
        if module not in imports:
            imports.append(module)
    if imports:
        d['custom_imports'] = dict(custom, imports=imports)
    else:
        d.pop('custom_imports', None)
    optim = d.get('optim_wrapper') or {}
    if not needs_flora_mm and optim.get('constructor') == 'LayerDecayOptimWrapperConstructor':
        vanilla = (export.layer_decay_constructor if export is not None else {}).get(
            d.get('default_scope'))
        if vanilla:  # same paramwise_cfg keys: decay_rate, decay_type, num_layers
            optim['constructor'] = vanilla
        else:
            optim.pop('constructor')
            optim.pop('paramwise_cfg', None)
    return Config(d)


def check_out_path(out: str) -> None:
    """OUT is refused before any work unless it is a ``.pth`` file path whose folder exists or
    can be created."""
    if osp.isdir(out) or out.endswith(('/', os.sep)):
        raise MergeError(f'OUT is a directory: {out}; give the checkpoint file to write, e.g. '
                         f'{osp.join(out, "merged.pth")}')
    if not out.endswith('.pth'):
        raise MergeError(f'OUT must be a .pth file (the config is written beside it as .py), '
                         f'got {out}; e.g. {osp.splitext(out)[0]}.pth')
    parent = osp.dirname(osp.abspath(out))
    while not osp.exists(parent):
        parent = osp.dirname(parent)
    if not osp.isdir(parent) or not os.access(parent, os.W_OK):
        raise MergeError(f'cannot write OUT {out}: {parent} is not a writable folder')


def out_config_path(out: str) -> str:
    return osp.splitext(out)[0] + '.py'


# ------------------------------------------------------------------------ the steps
def _load(cfg: Config, config: str, checkpoint: str, adapter: bool) -> tuple[nn.Module, dict]:
    """The adapted model with the trained weights, and the source's meta."""
    try:
        model = build_model(cfg, load_pretrained=adapter)
    except FileNotFoundError as err:
        raise MergeError(f'{err} (an adapter-only checkpoint takes its base weights from the '
                         "config's pretrained init_cfg)") from err
    if not list(injected_roots(model)):
        raise MergeError(f'{config} injects no PEFT method (no PEFTBackbone and no '
                         'FLoRAHook(peft=...)): nothing to merge')
    if adapter:
        return model, load_adapter_only(model, checkpoint, config).get('meta', {})
    return model, load_full_checkpoint(model, checkpoint, config)


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _plain_backbone(model: nn.Module, cfg: Config, plain_keys: bool
                    ) -> tuple[dict[str, torch.Tensor], Optional[dict], Optional[Export]]:
    """State dict and backbone config to write for a merged model, and the export the
    backbone's description made of it (None: the backbone keeps its class). A None config
    keeps the config's ``model.backbone``."""
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model.state_dict().items())
    backbone = getattr(model, 'backbone', None)
    peft_cfg = peft_backbone_cfg(cfg)
    inner_cfg = copy.deepcopy(peft_cfg['backbone'] if peft_cfg is not None
                              else cfg.model.get('backbone', {}))
    inner_cfg = inner_cfg.to_dict() if hasattr(inner_cfg, 'to_dict') else dict(inner_cfg)
    export = None
    if isinstance(backbone, nn.Module) and not plain_keys:
        try:
            export = describe(backbone).export(_sub_state(state, 'backbone.'), inner_cfg)
        except ValueError as err:
            raise MergeError(f'{err}; pass --plain-keys') from err
    if export is not None:
        state = OrderedDict([(k, v) for k, v in state.items() if not k.startswith('backbone.')]
                            + [('backbone.' + k, v) for k, v in export.state.items()])
        return state, export.cfg, export
    if peft_cfg is not None:  # the merged checkpoint holds every weight: read none at build
        inner_cfg = without_weights(inner_cfg)
        inner_cfg.pop('init_cfg', None)
        return state, inner_cfg, None
    return state, None, None


def _meta(src_meta: dict, cfg: Config, checkpoint: str, adapter: bool, methods: dict,
          layers: int, backbone: str) -> dict:
    """Checkpoint meta in built-in types only; dataset_meta as mmengine stores it."""
    meta = dict(
        flora_mm=dict(
            note='adapters merged into the base weights by tools/merge_adapters.py; no '
                 'adapter tensors remain',
            source=osp.abspath(checkpoint), source_kind='adapter' if adapter else 'full',
            methods={name: method.to_dict() for name, method in methods.items()},
            merged_layers=layers, backbone=backbone),
        mmengine_version=mmengine.__version__)
    for key in ('epoch', 'iter', 'experiment_name', 'seed'):
        if key in src_meta:
            meta[key] = src_meta[key]
    ds_meta = src_meta.get('dataset_meta') or dataset_meta(cfg)
    if ds_meta:
        meta['dataset_meta'] = ds_meta
    return to_plain(meta, unknown='str', sequences='keep')


def merge(config: str, checkpoint: str, out: str, adapter: bool = False,
          plain_keys: bool = False, force: bool = False, check: bool = True,
          cfg_options: Optional[dict] = None) -> dict:
    """Merge ``checkpoint`` (full or adapter-only) per ``config`` and write ``out`` + its config.

    Returns a summary: written paths, backbone type, merged layers, verification error.
    Raises MergeError for bad input; nothing is written then.
    """
    check_out_path(out)
    out_cfg = out_config_path(out)
    if not osp.exists(checkpoint):  # a file, or a DCP checkpoint directory
        raise MergeError(f'checkpoint not found: {checkpoint}')
    for path in (out, out_cfg):
        if osp.exists(path) and not force:
            raise MergeError(f'{path} exists (pass --force to overwrite)')
    adapter = is_adapter_checkpoint(checkpoint, adapter)
    try:
        if adapter:  # the sidecar must exist before anything is built
            read_adapter_info(checkpoint)
        cfg = load_config(config, cfg_options)
    except (FileNotFoundError, ValueError) as err:
        raise MergeError(str(err)) from err

    model, src_meta = _load(cfg, config, checkpoint, adapter)
    methods = {name: method for name, _, method in injected_roots(model)}
    backbone = getattr(model, 'backbone', None)
    probe = ref = None
    if check and isinstance(backbone, nn.Module):
        probe = _probe(backbone)
        ref = _features(backbone, probe)
    layers = len(list(adapter_layers(model)))
    remove_adapters(model, merge=True)

    state, backbone_cfg, export = _plain_backbone(model, cfg, plain_keys)
    # flora_mm stays imported only for modules vanilla OpenMMLab lacks (InternViT, --plain-keys)
    needs_flora_mm = any(_is_flora_mm(m) for name, m in model.named_modules()
                         if not (export and (name + '.').startswith('backbone.')))
    err = None
    if ref is not None:
        fp32 = all(p.dtype == torch.float32 for p in backbone.parameters())
        written = backbone
        if export is not None:
            written = build_exported(export)
        err = verify(ref, _features(written, probe), fp32)
        del written

    backbone_type = (backbone_cfg or {}).get('type', type(backbone).__name__)
    ckpt = {'meta': _meta(src_meta, cfg, checkpoint, adapter, methods, layers, backbone_type),
            'state_dict': state}
    out_config = merged_config(cfg, export, backbone_cfg, needs_flora_mm)
    with atomic_paths(out, out_cfg) as (tmp_ckpt, tmp_cfg):
        torch.save(ckpt, tmp_ckpt)
        out_config.dump(tmp_cfg)
    return dict(checkpoint=out, config=out_cfg, backbone=backbone_type, merged_layers=layers,
                methods=sorted({m.name for m in methods.values()}), verify_error=err)


def format_summary(summary: dict) -> str:
    """What tools/merge_adapters.py prints after a merge."""
    err = summary['verify_error']
    return (f'merged {summary["merged_layers"]} adapted layers '
            f'({", ".join(summary["methods"])}); backbone: {summary["backbone"]}'
            + (f'; verified, max relative difference {err:.2e}' if err is not None else '')
            + f'\nwrote {summary["checkpoint"]}\n      {summary["config"]}')
