"""ConvNeXt-V2 backbone for OpenMMLab dense prediction, built from timm's ConvNeXt.

timm's modules are kept at the top level (``stem``, ``stages``) so the state-dict keys are
timm's own keys (minus the classifier head): a timm checkpoint loads as is, and adapter targets
are addressed with timm's names (``stages.2.blocks.5.conv_dw``, ``...mlp.fc1``).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import GlobalResponseNormMlp, LayerNorm2d
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXtBlock, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from flora_mm.registry import MODELS

from ..ops import conv2d_forward
from ..peft.base import AdapterLayer
from ..ops.recomputed_input import RecomputeStats, run_with_recomputed_input
from .lean_block import LeanBlock, RecomputeStatsAttribute, has_call_hooks

from ._checkpoint import (DEFAULT_MIN_LOADED_SHARE, init_weights_from_cfg, load_by_keys,
                          read_state_dict, select_prefix)

# Every ConvNeXt-V2 size timm defines: name -> (depths, dims), for reference and validation.
CONVNEXTV2_ARCHS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    'atto': ((2, 2, 6, 2), (40, 80, 160, 320)),
    'femto': ((2, 2, 6, 2), (48, 96, 192, 384)),
    'pico': ((2, 2, 6, 2), (64, 128, 256, 512)),
    'nano': ((2, 2, 8, 2), (80, 160, 320, 640)),
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
    'huge': ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

# Classifier / pooled-feature parts of a timm checkpoint that a dense backbone does not have.
_DROP_PREFIXES = ('head.', 'norm_pre.')


@MODELS.register_module()
class ConvNeXtV2(BaseModule):
    """ConvNeXt-V2 (timm ``convnextv2_<arch>``) returning multi-scale NCHW feature maps.

    Args:
        arch: timm size name: atto, femto, pico, nano, tiny, small, base, large, huge.
        out_indices: stages whose outputs are returned (strides 4, 8, 16, 32).
        drop_path_rate: stochastic depth rate, passed to timm.
        out_norm: add a channels-first LayerNorm (``norm{i}``) per output, as OpenMMLab's
            ConvNeXt dense-prediction backbones do; these are new parameters (not pretrained).
        frozen_stages: freeze the stem and stages ``0..frozen_stages`` (-1 freezes nothing).
        with_cp: non-reentrant activation checkpointing per block (saves memory when training).
        recompute_adapter_inputs: when ``mlp.fc1``/``mlp.fc2`` carry adapters, rebuild their
            inputs (the LayerNorm and GRN outputs) in backward instead of keeping them, so an
            adapted block keeps what a frozen one keeps, for one element-wise pass each
            (docs/performance.md). Gradients are bit-identical either way.
        init_cfg: ``dict(type='Pretrained', checkpoint=LOCAL_PATH[, prefix='backbone.'])`` loads
            a local checkpoint in timm or official ConvNeXt-V2/FCMAE key layout; other mmengine
            init configs are applied as usual.

    The blocks run ``_block_forward`` (``ConvNeXtV2Block``): timm's block with GRN computed in
    one pass.
    """

    #: set a RecomputeStats here to have the lean block path count what it does (tests,
    #: benchmark); None in training, where counting would only grow
    recompute_stats = RecomputeStatsAttribute()

    def __init__(self,
                 arch: str = 'atto',
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.0,
                 out_norm: bool = True,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 recompute_adapter_inputs: bool = True,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if arch not in CONVNEXTV2_ARCHS:
            raise ValueError(f'unknown ConvNeXt-V2 arch {arch!r}; '
                             f'choose one of {sorted(CONVNEXTV2_ARCHS)}')
        self.arch = arch
        self.out_indices = tuple(int(i) for i in out_indices)
        if not self.out_indices or any(i < 0 or i > 3 for i in self.out_indices):
            raise ValueError(f'out_indices must be in 0..3, got {out_indices}')
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.recompute_adapter_inputs = recompute_adapter_inputs

        # pretrained=False: weights only ever come from local files (init_weights).
        model = timm.create_model(f'convnextv2_{arch}', pretrained=False, num_classes=0,
                                  drop_path_rate=drop_path_rate)
        self.stem = model.stem
        self.stages = model.stages
        for stage in self.stages:
            for block in stage.blocks:
                if _has_grn_layout(block):
                    # timm's stages build ConvNeXtBlocks; the subclass adds a forward and no
                    # state (same parameters, keys and init), so the instances switch class
                    block.__class__ = ConvNeXtV2Block
        # model.head (final norm + classifier) is deliberately not kept.
        dims = CONVNEXTV2_ARCHS[arch][1]
        self.out_channels = [dims[i] for i in self.out_indices]

        self.out_norm = out_norm
        if out_norm:
            for i in self.out_indices:
                self.add_module(f'norm{i}', LayerNorm2d(dims[i], eps=1e-6))
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        """Stop gradients through the stem and the first stages (no BN, so no eval mode)."""
        if self.frozen_stages < 0:
            return
        modules = [self.stem] + [self.stages[i] for i in range(self.frozen_stages + 1)]
        for m in modules:
            for p in m.parameters():
                p.requires_grad = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return the feature maps of ``out_indices`` as a tuple of NCHW tensors."""
        x = self.stem(x)
        outs = []
        training = self.training and torch.is_grad_enabled()
        lean = (training and self.recompute_adapter_inputs and not self.with_cp
                and not torch.compiler.is_compiling())  # inductor picks what to recompute
        for i, stage in enumerate(self.stages):
            x = stage.downsample(x)
            for block in stage.blocks:
                if self.with_cp and training:
                    x = checkpoint(block, x, use_reentrant=False)
                elif isinstance(block, ConvNeXtV2Block):  # FSDP2 units too (a subclass)
                    x = block(x, lean=lean)
                else:
                    x = block(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x) if self.out_norm else x)
        # timm's LayerNorm2d returns a channels-last strided view, and convs keep that layout;
        # mmcv's RoIAlign / RoIAlignRotated read raw NCHW memory and give wrong features for it
        return tuple(o.contiguous() for o in outs)

    # ------------------------------------------------------------------ pretrained weights
    def init_weights(self) -> None:
        """Apply init_cfg; a 'Pretrained' entry loads a local file via ``load_pretrained``.

        mmengine's own PretrainedInit is bypassed: it loads the file's keys as they are, would
        download URLs, and cannot convert the official ConvNeXt-V2 layouts.
        """
        init_weights_from_cfg(self)

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None,
                        allow_shape_mismatch: bool = False,
                        min_loaded_share: float = DEFAULT_MIN_LOADED_SHARE,
                        ) -> Tuple[List[str], List[str]]:
        """Load a local checkpoint in timm or official layout; return (missing, unexpected).

        The stem and every stage up to the last out index must load completely (else
        PretrainedLoadError naming the blocks and the matching ``arch``); see ``load_by_keys``
        for the other checks.
        """
        sd = select_prefix(read_state_dict(checkpoint), prefix)
        sd = self.convert_state_dict(sd)
        last = max(self.out_indices)
        return load_by_keys(self, sd, f'ConvNeXtV2-{self.arch} <- {checkpoint}',
                            expected_missing=[f'norm{i}.' for i in self.out_indices],
                            required=['stem.'] + [f'stages.{i}.' for i in range(last + 1)],
                            hint=self._arch_hint, allow_shape_mismatch=allow_shape_mismatch,
                            min_loaded_share=min_loaded_share)

    def _arch_hint(self, sd: Dict[str, torch.Tensor]) -> str:
        """Name the arch whose depths match the file, and the stages it fills completely."""
        blocks: Dict[int, set] = {}
        for k in sd:
            m = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', k)
            if m:
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        depths = tuple(len(blocks.get(i, ())) for i in range(4))
        archs = [a for a, (d, _) in CONVNEXTV2_ARCHS.items() if d == depths]
        own = CONVNEXTV2_ARCHS[self.arch][0]
        full = tuple(i for i in range(4) if depths[i] >= own[i])
        text = f'The file holds {depths} blocks per stage (arch {self.arch!r}: {own})'
        if archs:
            text += f': use arch={archs[0]!r}' + (f' (or {archs[1:]})' if archs[1:] else '')
        if full and full != tuple(range(4)):
            text += f', or out_indices within the complete stages {full}'
        return text + '.'

    def convert_state_dict(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Bring a checkpoint of any supported layout to this module's (timm) key names."""
        if _is_sparse_fcmae(sd):
            sd = _sparse_fcmae_to_dense(sd)
        if _is_official_layout(sd):
            sd = self._official_to_timm(sd)
        return {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}

    def _official_to_timm(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official (facebookresearch/ConvNeXt-V2) names -> timm names via timm's own filter.

        The filter is applied one key at a time: it looks up each 2-D tensor's target shape in
        ``model.state_dict()`` and raises KeyError for a key the model lacks; such keys are
        kept under their original name so they are reported as unexpected instead.
        """
        out = {}
        for k, v in sd.items():
            try:
                out.update(checkpoint_filter_fn({k: v}, self))
            except KeyError:
                out[k] = v
        return out


def _has_grn_layout(block: nn.Module) -> bool:
    """A timm ConvNeXt-V2 block of the layout ``_block_forward`` computes (others keep timm's
    class and forward)."""
    return (type(block) is ConvNeXtBlock and type(block.mlp) is GlobalResponseNormMlp
            and type(block.mlp.grn) is GlobalResponseNorm
            and isinstance(block.shortcut, nn.Identity))


class ConvNeXtV2Block(LeanBlock, ConvNeXtBlock):
    """timm's ConvNeXt-V2 block whose forward is ``_block_forward``: with ``lean``, adapted
    fc1/fc2 keep no copy of their inputs. As the block's own forward it runs inside the
    module's call (hooks, FSDP2's unshard/reshard)."""

    def forward(self, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
        return _block_forward(self, x, lean, self.recompute_stats)


def _block_forward(block: ConvNeXtBlock, x: torch.Tensor, lean: bool = False,
                   stats: Optional[RecomputeStats] = None) -> torch.Tensor:
    """timm's ``ConvNeXtBlock.forward`` (GRN MLP, linear or 1x1-conv) with two changes.

    * GRN's ``x + b + w * (x * n)`` is computed as ``x * (1 + w * n) + b``: the same function
      in one pass over the MLP's widest tensor instead of three (rounding differs from timm's
      at the 1e-7 level). Every method runs it, Floor included.
    * ``lean``: adapted fc1/fc2 keep no copy of their inputs. Both are rebuilt in backward,
      fc1's from the LayerNorm's input and fc2's from the GRN's input, which the block keeps
      anyway; gradients are bit-identical to keeping them.
    """
    shortcut = x
    conv = block.conv_dw
    if type(conv) is nn.Conv2d and not has_call_hooks(conv):
        # a plain conv (Full trains its weight) gets the kernel choice adapted convs make
        x = conv2d_forward(conv, x, conv.weight, conv.bias)
    else:
        x = conv(x)
    if not block.use_conv_mlp:
        x = x.permute(0, 2, 3, 1)
    mlp, grn = block.mlp, block.mlp.grn
    mixed = x  # the LayerNorm's input, which its autograd node keeps
    if lean and isinstance(mlp.fc1, AdapterLayer):
        x = run_with_recomputed_input(mlp.fc1, block.norm(mixed), lambda: block.norm(mixed),
                                      (mixed,), stats)
    else:
        x = mlp.fc1(block.norm(mixed))
    h = mlp.drop1(mlp.act(x))
    x_g = h.norm(p=2, dim=grn.spatial_dim, keepdim=True)
    x_n = x_g / (x_g.mean(dim=grn.channel_dim, keepdim=True) + grn.eps)
    scale = 1 + grn.weight.view(grn.wb_shape) * x_n  # (N, 1, 1, C): small

    def grn_out() -> torch.Tensor:
        return torch.addcmul(grn.bias.view(grn.wb_shape), h, scale)

    if lean and isinstance(mlp.fc2, AdapterLayer):
        x = run_with_recomputed_input(mlp.fc2, grn_out(), grn_out, (h, scale), stats)
    else:
        x = mlp.fc2(grn_out())
    x = mlp.drop2(x)
    if not block.use_conv_mlp:
        x = x.permute(0, 3, 1, 2)
    if block.gamma is not None:
        x = x.mul(block.gamma.reshape(1, -1, 1, 1))
    return block.drop_path(x) + shortcut


def _is_official_layout(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith('downsample_layers.') or re.match(r'stages\.\d+\.\d+\.', k)
               for k in sd)


def _is_sparse_fcmae(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith('encoder.') or k.endswith('.kernel') for k in sd)


def _sparse_fcmae_to_dense(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """FCMAE pre-training checkpoint (MinkowskiEngine encoder) -> official dense layout.

    Hand-written because timm's ``checkpoint_filter_fn`` only knows the dense fine-tuning
    layout. It follows the official ``remap_checkpoint_keys``: keep the ``encoder.`` part
    (decoder/mask token are pre-training only), turn Minkowski ``kernel`` tensors into conv
    weights, drop the ``ln``/``linear`` wrapper level, make (1, C) biases 1-D and GRN params
    (1, 1, 1, C).
    """
    if any(k.startswith('encoder.') for k in sd):
        dropped = [k for k in sd if not k.startswith('encoder.')]
        if dropped:
            print_log(f'FCMAE checkpoint: ignoring {len(dropped)} pre-training-only tensors '
                      f'(decoder, mask token, ...): {", ".join(dropped[:8])}', logger='current')
        sd = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}
    out = {}
    for k, v in sd.items():
        if k.endswith('.kernel'):
            k = k[:-len('.kernel')] + '.weight'
            ks = int(math.isqrt(v.shape[0]))
            if v.dim() == 3:  # (k*k, in, out) dense conv
                _, cin, cout = v.shape
                v = v.permute(2, 1, 0).reshape(cout, cin, ks, ks).transpose(3, 2)
            else:  # (k*k, C) depthwise conv
                v = v.permute(1, 0).reshape(v.shape[1], 1, ks, ks).transpose(3, 2)
            out[k] = v.contiguous()
            continue
        parts = [p for p in k.split('.') if p not in ('ln', 'linear')]
        k = '.'.join(parts)
        if 'grn' in k:
            v = v.reshape(1, 1, 1, -1)
        elif k.endswith('bias') and v.dim() != 1:
            v = v.reshape(-1)
        out[k] = v
    return out


# ------------------------------------------------------------------ outgoing: mmpretrain layout
# timm block key (after ``stages.S.blocks.B.``) -> mmpretrain ``ConvNeXtBlock`` key. ConvNeXt-V2
# has no layer scale (``gamma``), so every block key is one of these.
_MMPRETRAIN_BLOCK_RENAMES = (
    (r'conv_dw\.', 'depthwise_conv.'),
    (r'norm\.', 'norm.'),
    (r'mlp\.fc1\.', 'pointwise_conv1.'),
    (r'mlp\.fc2\.', 'pointwise_conv2.'),
    (r'mlp\.grn\.weight$', 'grn.gamma'),
    (r'mlp\.grn\.bias$', 'grn.beta'),
)


def timm_to_mmpretrain_key(key: str) -> str:
    """One ConvNeXtV2 (timm) key -> mmpretrain ``ConvNeXt`` key; ValueError if it has none."""
    m = re.fullmatch(r'stem\.(\d)\.(.+)', key)
    if m:
        return f'downsample_layers.0.{m[1]}.{m[2]}'
    m = re.fullmatch(r'stages\.(\d+)\.downsample\.(\d)\.(.+)', key)
    if m:
        return f'downsample_layers.{m[1]}.{m[2]}.{m[3]}'
    m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', key)
    if m:
        for pattern, new in _MMPRETRAIN_BLOCK_RENAMES:
            if re.match(pattern, m[3]):
                return f'stages.{m[1]}.{m[2]}.{re.sub(pattern, new, m[3], count=1)}'
    if re.fullmatch(r'norm\d\.(weight|bias)', key):
        return key
    raise ValueError(f'no mmpretrain ConvNeXt name for backbone key {key!r}')


def timm_to_mmpretrain(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a ConvNeXtV2 state dict for mmpretrain's ``ConvNeXt``; timm's 1x1-conv MLP
    (atto..nano: ``conv_mlp=True``) becomes mmpretrain's Linear (it always uses Linear)."""
    out = {}
    for key, value in sd.items():
        new = timm_to_mmpretrain_key(key)
        if '.pointwise_conv' in new and new.endswith('.weight') and value.dim() == 4:
            if value.shape[2:] != (1, 1):
                raise ValueError(f'{key}: expected a 1x1 conv, got shape {tuple(value.shape)}')
            value = value.flatten(1)
        out[new] = value
    return out


def mmpretrain_convnext_cfg(backbone: ConvNeXtV2, drop_path_rate: float = 0.0) -> dict:
    """mmpretrain ``ConvNeXt`` arguments that build the same network as ``backbone``."""
    if not backbone.out_norm:
        raise ValueError('ConvNeXtV2(out_norm=False) has no mmpretrain ConvNeXt equivalent '
                         '(it always normalises its outputs)')
    frozen = backbone.frozen_stages
    # flora_mm freezes stem + stages[0..n]; mmpretrain's frozen_stages=m freezes stages [0, m)
    return dict(type='mmpretrain.ConvNeXt', arch=backbone.arch,
                out_indices=list(backbone.out_indices), drop_path_rate=float(drop_path_rate),
                layer_scale_init_value=0., use_grn=True, gap_before_final_norm=False,
                frozen_stages=frozen + 1 if frozen >= 0 else 0, with_cp=bool(backbone.with_cp))
