"""Descriptions of flora_mm's own backbones (ConvNeXtV2 on timm's names, InternViT)."""
from __future__ import annotations

import re

from torch import nn

from .base import BackboneDescription, Export, register_description

_CONVNEXT = re.compile(r'^stages\.(\d+)\.(downsample|blocks)(?:\.(\d+))?\.')
_VIT_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_EMBEDDINGS = ('cls_token', 'mask_token', 'pos_embed')


def convnext_layer_id(stage: int, downsample: bool, block: int | None, num_layers: int,
                      decay_type: str) -> int:
    """mmdet's / mmseg's ``get_layer_id_for_convnext`` and mmseg's ``get_stage_id_for_convnext``
    once a name is parsed into its stage and its downsample layer or block: the same rule for
    every ConvNeXt naming (timm's, mmpretrain's)."""
    if decay_type == 'stage_wise':
        return 0 if downsample else stage + 1
    if downsample:
        return (0, 2, 3, num_layers)[stage]
    return (1, 2, 3 + block // 3, num_layers)[stage]


def vit_layer_id(name: str, block: re.Pattern, num_layers: int) -> tuple[int, bool]:
    """BEiT's ``get_num_layer_for_vit`` (mmseg's ``get_layer_id_for_vit``, InternVL's):
    embeddings and patch embedding 0, block N (``block``'s group 1) ``N + 1``, the rest the
    heads' id."""
    if name in _EMBEDDINGS or name.startswith('patch_embed.'):
        return 0, True
    m = block.match(name)
    if m is None:
        return num_layers + 1, False
    return int(m[1]) + 1, True


def output_norms(backbone: nn.Module) -> list[str]:
    """``norm{i}`` for every out index: the norms a detection / segmentation ConvNeXt adds."""
    return [rf'^norm{i}$' for i in backbone.out_indices]


@register_description('flora_mm.models.convnextv2.ConvNeXtV2')
class ConvNeXtV2Description(BackboneDescription):
    """timm-layout ConvNeXt(-V2): ``stem``, ``stages.S.downsample``, ``stages.S.blocks.B``;
    layer ids of mmdet's / mmseg's ``get_layer_id_for_convnext`` and mmseg's
    ``get_stage_id_for_convnext`` on these names."""

    unit_patterns = (r'^stages\.\d+\.blocks\.\d+$', r'^stem$')
    stage_pattern = r'^(stages\.\d+)'
    decay_types = ('layer_wise', 'stage_wise')

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        if name in _EMBEDDINGS or name.startswith('stem.'):
            return 0, True
        m = _CONVNEXT.match(name)
        if m is None:  # the output norms, new in every fine-tuning
            return num_layers + 1, False
        downsample = m[2] == 'downsample'
        return convnext_layer_id(int(m[1]), downsample, None if downsample else int(m[3]),
                                 num_layers, decay_type), True

    def modules_to_save(self) -> list[str]:
        return output_norms(self.backbone)

    def export(self, state: dict, cfg: dict) -> Export:
        """mmpretrain's ``ConvNeXt`` with its own key names, which mmdet's and mmseg's
        ConvNeXt recipes and their ``LearningRateDecayOptimizerConstructor`` use as they are."""
        from ..convnextv2 import mmpretrain_convnext_cfg, timm_to_mmpretrain
        spec = mmpretrain_convnext_cfg(self.backbone, cfg.get('drop_path_rate', 0.0))
        decay = 'LearningRateDecayOptimizerConstructor'
        return Export(spec, timm_to_mmpretrain(state), ['mmpretrain.models'],
                      dict(mmdet=decay, mmseg=decay, mmrotate=f'mmdet.{decay}'))


@register_description('flora_mm.models.internvit.InternViT')
class InternViTDescription(BackboneDescription):
    """InternVL's segmentation InternViT: ``patch_embed``, ``blocks.N``, the simple FPN
    ``up1..up4``; layer ids of InternVL's (BEiT's) ``get_num_layer_for_vit``."""

    unit_patterns = (r'^blocks\.\d+$', r'^patch_embed$', r'^up\d$')
    stage_pattern = r'^(blocks\.\d+)'
    decay_types = ('layer_wise',)

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        return vit_layer_id(name, _VIT_BLOCK, num_layers)  # the simple FPN: the heads' id

    def modules_to_save(self) -> list[str]:
        return [r'^up\d$'] if self.backbone.with_fpn else []
