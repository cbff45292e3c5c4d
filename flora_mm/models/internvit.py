"""InternViT backbone (InternVL's segmentation setup) built from timm's VisionTransformer.

Module names follow InternVL's ``segmentation/`` InternViT-6B (which are timm's names):
``patch_embed.proj``, ``pos_embed``, ``cls_token``, ``blocks.N.{norm1, attn.qkv, attn.q_norm,
attn.k_norm, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`` and the simple FPN
``up1..up4``; so InternVL checkpoints load by key, and HF-release checkpoints after renaming.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import LayerNorm, LayerNorm2d, Mlp, RmsNormFp32, resample_abs_pos_embed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from flora_mm.registry import MODELS

from ..peft.base import AdapterLayer
from ..ops.recomputed_input import RecomputeStats, run_with_recomputed_input
from .lean_block import LeanBlock, RecomputeStatsAttribute

from ._checkpoint import (DEFAULT_MIN_LOADED_SHARE, init_weights_from_cfg, load_by_keys,
                          read_state_dict, select_prefix)

# norm: 'rms' = RMSNorm (InternViT-6B), 'ln' = LayerNorm (InternViT-300M, as timm's model).
INTERNVIT_ARCHS: Dict[str, dict] = {
    # small model with the 6B's features (RMSNorm, full-width qk-norm, layer scale), for tests
    'tiny': dict(patch_size=14, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
                 qkv_bias=False, qk_norm=True, init_values=0.1, norm='rms', img_size=224),
    # timm vit_intern300m_patch14_448 (LayerNorm, qkv bias, no qk-norm, layer scale 0.1)
    '300m': dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                 qkv_bias=True, qk_norm=False, init_values=0.1, norm='ln', img_size=448),
    # InternViT-6B (InternVL): ~5.9B parameters
    '6b': dict(patch_size=14, embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0,
               qkv_bias=False, qk_norm=True, init_values=0.1, norm='rms', img_size=224),
}
_DEFAULT_OUT_INDICES = {'6b': (11, 23, 35, 47)}
_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class InternAttention(Attention):
    """timm Attention with InternViT's qk-norm: one norm over all heads (weight of size dim).

    timm's own qk-norm normalises each head separately (weight of size head_dim), which does
    not match InternViT-6B's checkpoints; everything else is timm's module.
    """

    def __init__(self, dim: int, num_heads: int = 8, qk_norm: bool = False,
                 norm_layer: Optional[type] = None, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, qk_norm=False, norm_layer=norm_layer, **kwargs)
        if qk_norm:
            dd = {k: kwargs[k] for k in ('device', 'dtype') if k in kwargs}
            self.q_norm = norm_layer(self.attn_dim, **dd)
            self.k_norm = norm_layer(self.attn_dim, **dd)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.attn_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


@MODELS.register_module()
class InternViT(BaseModule):
    """InternViT returning 4 feature levels (strides 4, 8, 16, 32 with the simple FPN).

    Args:
        arch: 'tiny', '300m', '6b', or a dict with the keys of ``INTERNVIT_ARCHS`` entries.
        img_size: training image size (int or (H, W)); sizes the stored position embedding.
            Other inputs work too (any H, W multiple of the patch): the position embedding is
            resampled on the fly. Defaults to the preset's pre-training size.
        out_indices: blocks whose outputs are taken (6b: 11, 23, 35, 47; others: 4 evenly
            spaced blocks ending with the last).
        with_fpn: InternVL's simple FPN: deconv x4, deconv x2, identity, max-pool (needs 4
            out_indices); without it the block outputs (stride = patch) are returned.
        fpn_final_norm: InternVL's ``with_final_norm``: a LayerNorm after each FPN branch.
        drop_path_rate: stochastic depth rate.
        with_cp: non-reentrant activation checkpointing per block, so adapters inside frozen
            blocks still get gradients when the block input does not require grad.
        recompute_adapter_inputs: adapted ``attn.qkv``, ``mlp.fc1`` and ``mlp.fc2`` keep no
            copy of their inputs (two norm outputs and the GELU output); those are rebuilt in
            backward from tensors the block keeps anyway. Gradients are bit-identical.
        dtype: 'float32' or 'bfloat16' (or 'float16'): the transformer's parameters are cast
            and its blocks run in that dtype; the FPN and the returned features are float32
            (the input's dtype if it is floating). Adapters injected later keep their own dtype.
        init_cfg: ``dict(type='Pretrained', checkpoint=LOCAL_PATH[, prefix=...])`` for a local
            file in InternVL or HF InternViT layout.
    """

    #: set a RecomputeStats here to count what the lean block path does (tests, benchmark)
    recompute_stats = RecomputeStatsAttribute()

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 img_size: Optional[Union[int, Tuple[int, int]]] = None,
                 out_indices: Optional[Sequence[int]] = None,
                 with_fpn: bool = True,
                 fpn_final_norm: bool = False,
                 drop_path_rate: float = 0.0,
                 with_cp: bool = False,
                 recompute_adapter_inputs: bool = True,
                 dtype: str = 'float32',
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch not in INTERNVIT_ARCHS:
                raise ValueError(f'unknown InternViT arch {arch!r}; '
                                 f'choose one of {sorted(INTERNVIT_ARCHS)} or pass a dict')
            cfg = dict(INTERNVIT_ARCHS[arch])
        else:
            cfg = dict(INTERNVIT_ARCHS['tiny'], **arch)
        if dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {dtype!r}')
        self.arch = arch if isinstance(arch, str) else 'custom'
        self.compute_dtype = _DTYPES[dtype]
        self.with_cp = with_cp
        self.recompute_adapter_inputs = recompute_adapter_inputs
        depth = cfg['depth']
        embed_dim = self.embed_dim = cfg['embed_dim']

        if out_indices is None:
            out_indices = _DEFAULT_OUT_INDICES.get(
                self.arch, tuple(depth * (i + 1) // 4 - 1 for i in range(4)))
        self.out_indices = tuple(sorted(int(i) % depth for i in out_indices))
        if with_fpn and len(self.out_indices) != 4:
            raise ValueError(f'with_fpn needs 4 out_indices, got {out_indices}')

        norm_layer = RmsNormFp32 if cfg['norm'] == 'rms' else LayerNorm
        vit = VisionTransformer(
            img_size=img_size or cfg['img_size'], patch_size=cfg['patch_size'],
            embed_dim=embed_dim, depth=depth, num_heads=cfg['num_heads'],
            mlp_ratio=cfg['mlp_ratio'], qkv_bias=cfg['qkv_bias'], qk_norm=cfg['qk_norm'],
            init_values=cfg['init_values'], num_classes=0, global_pool='', class_token=True,
            final_norm=False, dynamic_img_size=True, drop_path_rate=drop_path_rate,
            norm_layer=norm_layer, attn_layer=InternAttention, block_fn=InternViTBlock)
        # Keep only what InternVL's segmentation backbone has, under the same names.
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.blocks = vit.blocks
        if self.compute_dtype != torch.float32:
            self.to(self.compute_dtype)  # the FPN below is created afterwards: stays fp32

        self.with_fpn = with_fpn
        if with_fpn:
            def final_norm() -> nn.Module:
                return LayerNorm2d(embed_dim) if fpn_final_norm else nn.Identity()

            # Same structure (and so the same keys) as InternVL's up1..up4.
            self.up1 = nn.Sequential(
                nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2), LayerNorm2d(embed_dim),
                nn.GELU(), nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2), final_norm())
            self.up2 = nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2), final_norm())
            self.up3 = nn.Sequential(nn.Identity(), final_norm())
            self.up4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2), final_norm())
            for m in self.modules():
                if isinstance(m, nn.ConvTranspose2d):
                    self.init_new_module(m)
        self.out_channels = [embed_dim] * len(self.out_indices)

    @staticmethod
    @torch.no_grad()
    def init_new_module(module: nn.Module) -> None:
        """Initialise a module the pretrained file does not fill (the simple FPN): InternVL's
        fan-out normal init for its deconvolutions, torch's ``reset_parameters`` otherwise.
        The seed rule (``flora_mm/engine/seeded_init.py``) calls it per module."""
        if isinstance(module, nn.ConvTranspose2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            nn.init.zeros_(module.bias)
        elif hasattr(module, 'reset_parameters'):
            module.reset_parameters()

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patch grid the stored position embedding is laid out for."""
        return tuple(self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return NCHW feature maps (4 FPN levels, or one per out index without the FPN)."""
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        B = x.shape[0]
        x = self.patch_embed(x.to(self.compute_dtype))  # (B, h, w, C): timm's dynamic-size NHWC
        h, w = x.shape[1:3]
        pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=(h, w),
                                           old_size=self.grid_size, num_prefix_tokens=1,
                                           antialias=False)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(1, 2)], dim=1)
        x = x + pos_embed.to(x.dtype)

        use_cp = self.with_cp and self.training and torch.is_grad_enabled()
        lean = (not use_cp and self.recompute_adapter_inputs and self.training
                and torch.is_grad_enabled() and not torch.compiler.is_compiling())
        feats = []
        for i, block in enumerate(self.blocks):
            if use_cp:
                x = checkpoint(block, x, use_reentrant=False)
            else:  # FSDP2 units too (a subclass)
                x = block(x, lean=lean) if isinstance(block, InternViTBlock) else block(x)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, self.embed_dim, h, w))

        if not self.with_fpn:
            return tuple(f.to(out_dtype).contiguous() for f in feats)
        fpn_dtype = self.up1[0].weight.dtype
        ups = (self.up1, self.up2, self.up3, self.up4)
        outs = [up(f.to(fpn_dtype)) for up, f in zip(ups, feats)]
        return tuple(o.to(out_dtype).contiguous() for o in outs)

    # ------------------------------------------------------------------ pretrained weights
    def init_weights(self) -> None:
        """Apply init_cfg; a 'Pretrained' entry loads a local file via ``load_pretrained``."""
        init_weights_from_cfg(self)

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None,
                        allow_shape_mismatch: bool = False,
                        min_loaded_share: float = DEFAULT_MIN_LOADED_SHARE,
                        ) -> Tuple[List[str], List[str]]:
        """Load a local InternVL- or HF-layout checkpoint (a file, a shard index or a release
        directory); return (missing, unexpected).

        The embeddings and every block up to the last out index must load (else
        PretrainedLoadError naming the blocks and the matching depth / out_indices); the
        position embedding is resampled to this model's grid automatically.
        """
        sd = select_prefix(read_state_dict(checkpoint), prefix)
        sd = self.convert_state_dict(sd)
        required = ['patch_embed.', 'pos_embed', 'cls_token'] + [
            f'blocks.{i}.' for i in range(max(self.out_indices) + 1)]
        return load_by_keys(self, sd, f'InternViT-{self.arch} <- {checkpoint}',
                            expected_missing=['up1.', 'up2.', 'up3.', 'up4.'],
                            required=required, hint=self._depth_hint,
                            allow_shape_mismatch=allow_shape_mismatch,
                            min_loaded_share=min_loaded_share)

    def _depth_hint(self, sd: Dict[str, torch.Tensor]) -> str:
        """Name the depth the file has and out_indices that fit it."""
        ids = {int(m[1]) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))}
        if not ids:
            return 'The file holds no transformer blocks.'
        n = max(ids) + 1
        fit = tuple(n * (i + 1) // 4 - 1 for i in range(4))
        return (f'The file holds {n} blocks (0..{n - 1}); the model has {len(self.blocks)} and '
                f'reads out_indices {self.out_indices}: build it with depth={n} '
                f"(arch=dict(..., depth={n})) and out_indices within 0..{n - 1}, e.g. {fit}.")

    def convert_state_dict(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename HF keys to InternVL's, resize pos-embed and patch kernel to this model."""
        if any(k.startswith('vision_model.') for k in sd):  # full InternVL / InternVL-C model
            sd = {k[len('vision_model.'):]: v for k, v in sd.items()
                  if k.startswith('vision_model.')}
        if any(k.startswith(('embeddings.', 'encoder.layers.')) for k in sd):
            sd = hf_to_internvl(sd)
        sd = dict(sd)
        if 'pos_embed' in sd and sd['pos_embed'].shape != self.pos_embed.shape:
            pos = sd['pos_embed']
            side = math.isqrt(pos.shape[1] - 1)
            if side * side == pos.shape[1] - 1:  # square pre-training grid (+ cls token)
                sd['pos_embed'] = resample_abs_pos_embed(
                    pos.float(), new_size=self.grid_size, old_size=(side, side),
                    num_prefix_tokens=1, antialias=False)
        key = 'patch_embed.proj.weight'
        if key in sd and sd[key].shape[-2:] != self.patch_embed.proj.weight.shape[-2:]:
            # InternVL's loader resizes the patch kernel the same way (bicubic).
            sd[key] = F.interpolate(sd[key].float(), size=self.patch_embed.proj.kernel_size,
                                    mode='bicubic', align_corners=False)
        return sd


def hf_to_internvl(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF InternViT (``InternVisionModel``) keys -> InternVL segmentation / timm keys."""
    out = {}
    for k, v in sd.items():
        if k == 'embeddings.class_embedding':
            k = 'cls_token'
        elif k == 'embeddings.position_embedding':
            k = 'pos_embed'
        elif k.startswith('embeddings.patch_embedding.'):
            k = 'patch_embed.proj.' + k[len('embeddings.patch_embedding.'):]
        elif k.startswith('encoder.layers.'):
            k = 'blocks.' + k[len('encoder.layers.'):]
            k = re.sub(r'^(blocks\.\d+\.ls[12])$', r'\1.gamma', k)  # bare Parameter in HF
        out[k] = v
    return out


class InternViTBlock(LeanBlock, Block):
    """timm's ViT block; with ``lean``, adapted qkv, fc1 and fc2 keep no copy of their inputs
    (``_lean_block_forward``). As the block's own forward it runs inside the module's call
    (hooks, FSDP2's unshard/reshard)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, lean: bool = False) -> torch.Tensor:
        if lean and attn_mask is None and not is_causal and _has_adapters(self):
            return _lean_block_forward(self, x, self.recompute_stats)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def _has_adapters(block: Block) -> bool:
    """A block of the layout ``_lean_block_forward`` replicates (timm's Mlp), with an adapter
    on qkv, fc1 or fc2."""
    if type(block.mlp) is not Mlp:
        return False
    return any(isinstance(m, AdapterLayer) for m in (block.attn.qkv, block.mlp.fc1,
                                                      block.mlp.fc2))


def _lean_block_forward(block: Block, x: torch.Tensor,
                        stats: Optional[RecomputeStats]) -> torch.Tensor:
    """timm's ``Block.forward`` op for op, except that qkv, fc1 and fc2 keep no copy of their
    inputs: norm1(x) and norm2(x) are rebuilt from the block's residual stream (which the norms
    keep), fc2's input from fc1's output (which GELU keeps)."""
    attn_in = x
    a = run_with_recomputed_input(block.attn, block.norm1(attn_in),
                                  lambda: block.norm1(attn_in), (attn_in,), stats)
    x = x + block.drop_path1(block.ls1(a))
    mlp, mlp_in = block.mlp, x
    hidden = run_with_recomputed_input(mlp.fc1, block.norm2(mlp_in),
                                       lambda: block.norm2(mlp_in), (mlp_in,), stats)
    if mlp.drop1.p == 0 or not mlp.training:  # a random mask could not be rebuilt
        h = run_with_recomputed_input(lambda z: mlp.fc2(mlp.norm(z)), mlp.act(hidden),
                                      lambda: mlp.act(hidden), (hidden,), stats)
    else:
        h = mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hidden))))
    return x + block.drop_path2(block.ls2(mlp.drop2(h)))
