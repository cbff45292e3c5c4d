"""Merge trained adapters into the base weights; write a checkpoint vanilla OpenMMLab code loads.

    python tools/merge_adapters.py CONFIG CHECKPOINT OUT [--adapter] [--plain-keys] [--force]
        [--no-verify] [--cfg-options k=v ...]

CHECKPOINT is either
  * a full checkpoint written by tools/train.py (``epoch_N.pth`` / ``iter_N.pth``), or
  * an adapter-only checkpoint written by FLoRAHook (``*_adapter.safetensors`` + its ``.json``;
    chosen by ``--adapter`` or by the ``.safetensors`` suffix). The frozen base weights then come
    from the config's pretrained backbone ``init_cfg`` (override its path with --cfg-options
    model.backbone.backbone.init_cfg.checkpoint=...); the sidecar's fingerprint must match them.

OUT gets ``{'state_dict', 'meta'}`` with the adapters merged (W0 + s*dW) and no adapter tensors;
it holds only tensors and plain Python values, so even torch.load(weights_only=True) reads it.
``<OUT without extension>.py`` gets the config to load it with: the original config with
PEFTBackbone replaced by the plain backbone, and without FLoRAHook.

Backbones:
  * ConvNeXtV2 -> mmpretrain's ``ConvNeXt`` (``use_grn=True, layer_scale_init_value=0.,
    gap_before_final_norm=False``), keys converted from timm's names to mmpretrain's; the
    written config imports ``mmpretrain.models`` instead of flora_mm, so vanilla
    mmdet / mmseg / mmrotate + mmpretrain (1.2.0) load it without flora_mm. (mmrotate
    1.0.0rc1 itself imports on Python >= 3.10 only after ``collections.Sequence`` & co. are
    aliased, as flora_mm.compat does.)
  * InternViT: OpenMMLab has no InternViT class, so the written config keeps flora_mm's
    ``InternViT`` type (plain keys, no adapters, no PEFTBackbone) and still imports flora_mm.
  * ``--plain-keys`` keeps flora_mm's ConvNeXtV2 the same way (timm key names).
  * A backbone adapted by ``FLoRAHook(peft=...)`` keeps its own type and key names.

Unless --no-verify, the backbone as written (mmpretrain's ConvNeXt, or the merged module) is run
on a random image and compared with the adapted backbone before merging.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import os.path as osp
import re
import sys
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import _peft_model as pm

import mmengine
import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

from flora_mm.peft import adapter_layers, injected_roots, remove_adapters
from flora_mm.peft.io import load_adapter_checkpoint, read_adapter_info

MMPRETRAIN_HINT = ('install mmpretrain (pip install mmpretrain==1.2.0) or pass --plain-keys to '
                   "keep flora_mm's ConvNeXtV2 type")


class MergeError(RuntimeError):
    """A user-facing error: bad input files or a checkpoint that does not fit the config."""


# ------------------------------------------------------------------------ timm -> mmpretrain
_BLOCK_RENAMES = (
    (r'conv_dw\.', 'depthwise_conv.'),
    (r'norm\.', 'norm.'),
    (r'mlp\.fc1\.', 'pointwise_conv1.'),
    (r'mlp\.fc2\.', 'pointwise_conv2.'),
    (r'mlp\.grn\.weight$', 'grn.gamma'),
    (r'mlp\.grn\.bias$', 'grn.beta'),
    (r'gamma$', 'gamma'),  # layer scale (ConvNeXt-V1 only; V2 has none)
)


def timm_to_mmpretrain_key(key: str) -> str:
    """One timm ConvNeXt(-V2) backbone key -> mmpretrain ``ConvNeXt`` key."""
    m = re.fullmatch(r'stem\.(\d)\.(.+)', key)
    if m:
        return f'downsample_layers.0.{m[1]}.{m[2]}'
    m = re.fullmatch(r'stages\.(\d+)\.downsample\.(\d)\.(.+)', key)
    if m:
        return f'downsample_layers.{m[1]}.{m[2]}.{m[3]}'
    m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', key)
    if m:
        for pattern, new in _BLOCK_RENAMES:
            if re.match(pattern, m[3]):
                return f'stages.{m[1]}.{m[2]}.{re.sub(pattern, new, m[3], count=1)}'
    if re.fullmatch(r'norm\d\.(weight|bias)', key):
        return key
    raise MergeError(f'no mmpretrain ConvNeXt name for backbone key {key!r}')


def timm_to_mmpretrain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ConvNeXtV2 state dict; timm's 1x1-conv MLP (atto..nano: ``conv_mlp=True``)
    becomes mmpretrain's Linear (it always uses Linear for the pointwise convs)."""
    out = OrderedDict()
    for key, value in state.items():
        new = timm_to_mmpretrain_key(key)
        if '.pointwise_conv' in new and new.endswith('.weight') and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise MergeError(f'{key}: expected a 1x1 conv, got shape {tuple(value.shape)}')
            value = value.flatten(1)
        out[new] = value
    return out


def mmpretrain_convnext_cfg(backbone: nn.Module, inner_cfg: dict) -> dict:
    """mmpretrain ``ConvNeXt`` arguments equivalent to a built flora_mm ConvNeXtV2."""
    if not getattr(backbone, 'out_norm', True):
        raise MergeError('ConvNeXtV2(out_norm=False) has no mmpretrain ConvNeXt equivalent '
                         '(it always normalises its outputs); pass --plain-keys')
    frozen = getattr(backbone, 'frozen_stages', -1)
    # flora_mm freezes stem + stages[0..n]; mmpretrain's frozen_stages=m freezes stages [0, m)
    return dict(type='mmpretrain.ConvNeXt', arch=backbone.arch,
                out_indices=list(backbone.out_indices),
                drop_path_rate=float(inner_cfg.get('drop_path_rate', 0.0)),
                layer_scale_init_value=0., use_grn=True, gap_before_final_norm=False,
                frozen_stages=frozen + 1 if frozen >= 0 else 0,
                with_cp=bool(getattr(backbone, 'with_cp', False)))


# ------------------------------------------------------------------------ loading
def is_adapter_checkpoint(path: str, adapter_flag: bool) -> bool:
    if adapter_flag and not path.endswith('.safetensors'):
        raise MergeError(f'--adapter: {path} is not an adapter-only checkpoint '
                         '(*_adapter.safetensors + .json, written by FLoRAHook)')
    return path.endswith('.safetensors')


def load_full_checkpoint(model: nn.Module, path: str, config: str) -> dict:
    """Load a tools/train.py checkpoint strictly; returns its ``meta``."""
    try:
        ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    except Exception as err:  # noqa: BLE001  (any unreadable file)
        raise MergeError(f'cannot read checkpoint {path}: {err}') from err
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise MergeError(f'{path} holds no state dict')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise MergeError(
            f'{path} does not fit {config}: {len(missing)} missing keys {_short(missing)}, '
            f'{len(unexpected)} unexpected keys {_short(unexpected)}, {len(mismatched)} shape '
            f'mismatches (file vs model) {_short(mismatched)}. Was it trained with this config '
            '(same PEFT method, rank, model size)?')
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


def _short(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    return '[' + ', '.join(items[:n]) + (', ...' if len(items) > n else '') + ']'


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


def _relative_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        raise MergeError(f'the written backbone returns {[tuple(t.shape) for t in got]}, the '
                         f'adapted one {[tuple(t.shape) for t in ref]}')
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
               for a, b in zip(ref, got))


def verify(ref: list[torch.Tensor], got: list[torch.Tensor], fp32: bool) -> float:
    """Fail if an fp32 backbone's outputs moved more than 1e-3 (relative); for bf16/fp16 a
    merge rounds W0 + dW once more, so only warn above 5e-2."""
    err = _relative_error(ref, got)
    if fp32 and err > 1e-3:
        raise MergeError(f'verification failed: the written backbone differs from the adapted '
                         f'one by {err:.2e} (relative max abs)')
    if err > 5e-2:
        print_log(f'merged backbone differs from the adapted one by {err:.2e} (low precision)',
                  logger='current', level=logging.WARNING)
    return err


# ------------------------------------------------------------------------ output
def _plain(value: Any) -> Any:
    """Meta values as built-in types only (ConfigDict etc. would need weights_only=False)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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


def merged_config(cfg: Config, backbone_cfg: Optional[dict], needs_flora_mm: bool,
                  needs_mmpretrain: bool) -> Config:
    """The config for the merged checkpoint: plain backbone, no FLoRAHook, matching imports."""
    d = cfg.to_dict()
    if backbone_cfg is not None:
        d['model']['backbone'] = backbone_cfg
    hooks = [h for h in d.get('custom_hooks', None) or [] if not pm.is_flora_hook(h)]
    if 'custom_hooks' in d:
        d['custom_hooks'] = hooks
    custom = d.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    imports = custom.get('imports', [])
    imports = [imports] if isinstance(imports, str) else list(imports)
    imports = [i for i in imports if i != 'flora_mm' and not i.startswith('flora_mm.')]
    if needs_flora_mm:
        imports.insert(0, 'flora_mm')
    if needs_mmpretrain and 'mmpretrain.models' not in imports:
        imports.append('mmpretrain.models')
    if imports:
        d['custom_imports'] = dict(custom, imports=imports)
    else:
        d.pop('custom_imports', None)
    return Config(d)


def _write_tmp(path: str, write: Callable[[str], None]) -> str:
    """Write to a temporary file beside ``path``; returns it (the caller renames it)."""
    fd, tmp = tempfile.mkstemp(dir=osp.dirname(osp.abspath(path)), prefix='.tmp-',
                               suffix=osp.basename(path))
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def out_config_path(out: str) -> str:
    return osp.splitext(out)[0] + '.py'


# ------------------------------------------------------------------------ the tool
def _load(cfg: Config, config: str, checkpoint: str, adapter: bool) -> tuple[nn.Module, dict]:
    """The adapted model with the trained weights, and the source's meta."""
    try:
        model = pm.build_model(cfg, load_pretrained=adapter)
    except FileNotFoundError as err:
        raise MergeError(f'{err} (an adapter-only checkpoint takes its base weights from the '
                         "config's pretrained init_cfg)") from err
    if not list(injected_roots(model)):
        raise MergeError(f'{config} injects no PEFT method (no PEFTBackbone and no '
                         'FLoRAHook(peft=...)): nothing to merge')
    if adapter:
        return model, load_adapter_only(model, checkpoint, config).get('meta', {})
    return model, load_full_checkpoint(model, checkpoint, config)


def _plain_backbone(model: nn.Module, cfg: Config, plain_keys: bool
                    ) -> tuple[dict[str, torch.Tensor], Optional[dict], bool]:
    """State dict and backbone config to write for a merged model, and whether the backbone
    became mmpretrain's ConvNeXt. A None config keeps the config's ``model.backbone``."""
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model.state_dict().items())
    backbone = getattr(model, 'backbone', None)
    peft_cfg = pm.peft_backbone_cfg(cfg)
    inner_cfg = copy.deepcopy(peft_cfg['backbone'] if peft_cfg is not None
                              else cfg.model.get('backbone', {}))
    inner_cfg = inner_cfg.to_dict() if hasattr(inner_cfg, 'to_dict') else dict(inner_cfg)
    if _is_flora_mm(backbone) and type(backbone).__name__ == 'ConvNeXtV2' and not plain_keys:
        converted = timm_to_mmpretrain(
            {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')})
        state = OrderedDict([(k, v) for k, v in state.items() if not k.startswith('backbone.')]
                            + [('backbone.' + k, v) for k, v in converted.items()])
        return state, mmpretrain_convnext_cfg(backbone, inner_cfg), True
    if peft_cfg is not None:
        inner_cfg.pop('init_cfg', None)  # the merged checkpoint holds every weight
        return state, inner_cfg, False
    return state, None, False


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
    return _plain(meta)


def merge(config: str, checkpoint: str, out: str, adapter: bool = False,
          plain_keys: bool = False, force: bool = False, check: bool = True,
          cfg_options: Optional[dict] = None) -> dict:
    """Merge ``checkpoint`` (full or adapter-only) per ``config`` and write ``out`` + its config.

    Returns a summary: written paths, backbone type, merged layers, verification error.
    """
    out_cfg = out_config_path(out)
    if out.endswith('.py'):
        raise MergeError(f'OUT must be the checkpoint path (e.g. merged.pth), got {out}')
    if not osp.isfile(checkpoint):
        raise MergeError(f'checkpoint not found: {checkpoint}')
    for path in (out, out_cfg):
        if osp.exists(path) and not force:
            raise MergeError(f'{path} exists (pass --force to overwrite)')
    adapter = is_adapter_checkpoint(checkpoint, adapter)
    try:
        if adapter:  # the sidecar must exist before anything is built
            read_adapter_info(checkpoint)
        cfg = pm.load_tool_config(config, cfg_options)
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

    state, backbone_cfg, to_mmpretrain = _plain_backbone(model, cfg, plain_keys)
    # flora_mm stays imported only for modules vanilla OpenMMLab lacks (InternViT, --plain-keys)
    needs_flora_mm = any(_is_flora_mm(m) for name, m in model.named_modules()
                         if not (to_mmpretrain and (name + '.').startswith('backbone.')))
    err = None
    if ref is not None:
        fp32 = all(p.dtype == torch.float32 for p in backbone.parameters())
        written = backbone
        if to_mmpretrain:
            written = build_mmpretrain_backbone(
                backbone_cfg, {k[len('backbone.'):]: v for k, v in state.items()
                               if k.startswith('backbone.')})
        err = verify(ref, _features(written, probe), fp32)
        del written

    backbone_type = (backbone_cfg or {}).get('type', type(backbone).__name__)
    ckpt = {'meta': _meta(src_meta, cfg, checkpoint, adapter, methods, layers, backbone_type),
            'state_dict': state}
    out_config = merged_config(cfg, backbone_cfg, needs_flora_mm, to_mmpretrain)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    tmp_ckpt = _write_tmp(out, lambda p: torch.save(ckpt, p))
    try:
        tmp_cfg = _write_tmp(out_cfg, out_config.dump)
    except BaseException:
        os.remove(tmp_ckpt)
        raise
    os.replace(tmp_ckpt, out)
    os.replace(tmp_cfg, out_cfg)
    return dict(checkpoint=out, config=out_cfg, backbone=backbone_type, merged_layers=layers,
                methods=sorted({m.name for m in methods.values()}), verify_error=err)


def build_mmpretrain_backbone(backbone_cfg: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """mmpretrain's ConvNeXt as the written config builds it, loaded strictly with ``state``."""
    try:
        from mmpretrain.models import ConvNeXt
    except ImportError as err:
        raise MergeError(f'cannot import mmpretrain ({err}): {MMPRETRAIN_HINT}') from err
    kwargs = {k: v for k, v in backbone_cfg.items() if k != 'type'}
    model = ConvNeXt(**kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise MergeError(f'converted keys do not fit mmpretrain ConvNeXt: {err}') from err
    return model


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog=__doc__.split('\n\n', 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='full .pth of tools/train.py, or *_adapter.safetensors')
    parser.add_argument('out', help='merged checkpoint to write (config: same name, .py)')
    parser.add_argument('--adapter', action='store_true',
                        help='CHECKPOINT is adapter-only (default: when it ends in .safetensors)')
    parser.add_argument('--plain-keys', action='store_true',
                        help="keep flora_mm's ConvNeXtV2 type and timm key names (needs flora_mm "
                             'to load) instead of converting to mmpretrain ConvNeXt')
    parser.add_argument('--force', action='store_true', help='overwrite OUT and its config')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip comparing the written backbone with the adapted one')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs (as train.py)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        summary = merge(args.config, args.checkpoint, args.out, adapter=args.adapter,
                        plain_keys=args.plain_keys, force=args.force, check=not args.no_verify,
                        cfg_options=args.cfg_options)
    except (MergeError, FileNotFoundError) as err:
        sys.exit(f'merge_adapters: error: {err}')
    err = summary['verify_error']
    print(f'merged {summary["merged_layers"]} adapted layers ({", ".join(summary["methods"])}); '
          f'backbone: {summary["backbone"]}'
          + (f'; verified, max relative difference {err:.2e}' if err is not None else ''))
    print(f'wrote {summary["checkpoint"]}\n      {summary["config"]}')


if __name__ == '__main__':
    main()
