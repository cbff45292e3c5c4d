"""Descriptions of OpenMMLab's backbones and of timm models under ``TIMMBackbone``.

Registered by import path: nothing of mmdet, mmpretrain, mmseg or timm is imported here.
Each docstring states the layer-id rule; ``(id, False)`` marks the parameters the rule leaves
out of the backbone's layers (new output norms, a ViT's final norm, a timm classifier): they
take the heads' id ``num_layers + 1`` and its learning rate, as the references' functions give
them. Names are relative to the backbone.
"""
from __future__ import annotations

import re
from functools import cached_property

from torch import nn

from .base import BackboneDescription, register_description
from .flora_mm_backbones import _EMBEDDINGS, convnext_layer_id, output_norms, vit_layer_id


# ----------------------------------------------------------------------------- mmdet ResNet
_RESNET_BLOCK = re.compile(r'^layer(\d+)\.(\d+)\.')


@register_description('mmdet.models.backbones.resnet.ResNet')
class ResNetDescription(BackboneDescription):
    """mmdet's ``ResNet`` (and ``ResNetV1d``, ``ResNeXt`` through their MRO): the stem
    (``conv1``/``bn1``, or ``stem`` for the deep stem), residual blocks ``layerS.B``.

    Layer ids. layer_wise: the stem 0, residual block ``b`` in forward order (counted over all
    stages from 0) ``b + 1``, as BEiT counts a ViT's blocks: ResNet-50 has ids 0..16, so
    ``num_layers=16``. stage_wise: the stem 0, ``layerS`` -> ``S`` (``num_layers=4``). No new
    modules (mmdet's ResNet has no output norms). FSDP units: every block and the deep stem;
    the plain stem (one conv, one norm) stays in the backbone's own unit.
    """

    unit_patterns = (r'^layer\d+\.\d+$', r'^stem$')
    stage_pattern = r'^(layer\d+)'
    decay_types = ('layer_wise', 'stage_wise')

    @cached_property
    def _first_block(self) -> dict[int, int]:
        """Blocks before each stage (stage numbers from 1, as in ``layerS``)."""
        first, total = {}, 0
        for name in self.backbone.res_layers:
            stage = int(name[len('layer'):])
            first[stage] = total
            total += len(getattr(self.backbone, name))
        return first

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        m = _RESNET_BLOCK.match(name)
        if m is None:  # the stem: conv1, bn1 or stem.*
            return 0, True
        stage, block = int(m[1]), int(m[2])
        if decay_type == 'stage_wise':
            return stage, True
        return self._first_block[stage] + block + 1, True


# ----------------------------------------------------------------------------- mmdet / mmseg Swin
_SWIN = re.compile(r'^stages\.(\d+)\.(blocks|downsample)(?:\.(\d+))?\.')


@register_description('mmdet.models.backbones.swin.SwinTransformer',
                      'mmseg.models.backbones.swin.SwinTransformer')
class SwinDescription(BackboneDescription):
    """mmdet's and mmseg's ``SwinTransformer`` (the same module names): ``patch_embed``, ``absolute_pos_embed``,
    ``stages.S.blocks.B``, ``stages.S.downsample`` (after the stage's blocks), the output norms
    ``norm{i}`` for ``out_indices``.

    Layer ids (mmpretrain's ``SwinTransformer.get_layer_depth``, BEiT's convention):
    layer_wise: ``patch_embed`` and ``absolute_pos_embed`` 0, block ``B`` of stage ``S``
    ``sum(depths[:S]) + B + 1``, ``stages.S.downsample`` with its stage's last block
    ``sum(depths[:S + 1])`` (``num_layers = sum(depths)``); stage_wise: embeddings 0,
    ``stages.S.*`` -> ``S + 1`` (``num_layers=4``). The output norms are new (mmdet adds one per
    out index; Swin's classification checkpoints have a single final ``norm``): heads' id, and
    they train under every method.
    """

    unit_patterns = (r'^stages\.\d+\.blocks\.\d+$', r'^patch_embed$')
    stage_pattern = r'^(stages\.\d+)'
    decay_types = ('layer_wise', 'stage_wise')

    @cached_property
    def _first_block(self) -> list[int]:
        first, total = [], 0
        for stage in self.backbone.stages:
            first.append(total)
            total += len(stage.blocks)
        return first + [total]

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        if name == 'absolute_pos_embed' or name.startswith('patch_embed.'):
            return 0, True
        m = _SWIN.match(name)
        if m is None:  # norm{i}
            return num_layers + 1, False
        stage = int(m[1])
        if decay_type == 'stage_wise':
            return stage + 1, True
        if m[2] == 'downsample':
            return self._first_block[stage + 1], True
        return self._first_block[stage] + int(m[3]) + 1, True

    def modules_to_save(self) -> list[str]:
        return output_norms(self.backbone)


# ----------------------------------------------------------------------------- mmpretrain ConvNeXt
_MMPRETRAIN_CONVNEXT = re.compile(r'^(downsample_layers|stages)\.(\d+)\.(?:(\d+)\.)?')


@register_description('mmpretrain.models.backbones.convnext.ConvNeXt')
class ConvNeXtDescription(BackboneDescription):
    """mmpretrain's ``ConvNeXt``: ``downsample_layers.0`` (the stem), ``downsample_layers.S``,
    blocks ``stages.S.B``, output norms ``norm{i}``.

    Layer ids exactly mmdet's ``get_layer_id_for_convnext`` (layer_wise: stem 0, stage 0 blocks
    1, ``downsample_layers.1`` and stage 1 blocks 2, ``downsample_layers.2`` 3, stage 2 block B
    ``3 + B // 3``, stage 3 and its downsample ``num_layers``) and mmseg's
    ``get_stage_id_for_convnext`` (stage_wise: every downsample layer 0, ``stages.S`` ``S + 1``);
    the output norms take the heads' id there and here. They train under every method (the
    classification checkpoints hold ``norm3`` only, and as the final norm before pooling).
    """

    unit_patterns = (r'^stages\.\d+\.\d+$', r'^downsample_layers\.0$')
    stage_pattern = r'^(stages\.\d+)'
    decay_types = ('layer_wise', 'stage_wise')

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        if name in _EMBEDDINGS:
            return 0, True
        m = _MMPRETRAIN_CONVNEXT.match(name)
        if m is None or (m[1] == 'stages' and m[3] is None):  # norm{i}
            return num_layers + 1, False
        downsample = m[1] == 'downsample_layers'
        return convnext_layer_id(min(int(m[2]), 3), downsample,
                                 None if downsample else int(m[3]), num_layers, decay_type), True

    def modules_to_save(self) -> list[str]:
        return output_norms(self.backbone)


# ----------------------------------------------------------------------------- mmpretrain ViT
_LAYER = re.compile(r'^layers\.(\d+)\.')


@register_description('mmpretrain.models.backbones.vision_transformer.VisionTransformer')
class VisionTransformerDescription(BackboneDescription):
    """mmpretrain's ``VisionTransformer``: ``cls_token``, ``pos_embed``, ``patch_embed``,
    ``layers.N``, the norms ``pre_norm`` / ``ln1`` / ``ln2``.

    Layer ids exactly mmseg's (BEiT's) ``get_layer_id_for_vit`` (layer_wise only): embeddings
    and ``patch_embed`` 0, ``layers.N`` ``N + 1`` (``num_layers`` = the depth); everything else
    (the pretrained norms ``pre_norm``, ``ln1``, ``ln2`` included) takes the heads' id there and
    here. Nothing is new: the checkpoints hold every module.
    """

    unit_patterns = (r'^layers\.\d+$', r'^patch_embed$')
    stage_pattern = r'^(layers\.\d+)'
    decay_types = ('layer_wise',)

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        return vit_layer_id(name, _LAYER, num_layers)


# ----------------------------------------------------------------------------- timm
def _block_lists(model: nn.Module) -> list[str]:
    """Names of the repeated blocks of a timm model: children of a ``Sequential`` /
    ``ModuleList`` whose children are numbered, of one class and hold parameters, the innermost
    such lists only (ConvNeXt's ``stages.S.blocks.B``, not ``stages.S``; EfficientNet's
    ``blocks.S.B``; not a ResNet block's ``downsample``, a conv and a norm)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or not len(module):
            continue
        children = list(module.named_children())
        if not all(n.isdigit() for n, _ in children):
            continue
        if len({type(c) for _, c in children}) != 1:
            continue
        if not all(any(True for _ in c.parameters()) for _, c in children):
            continue
        found.extend(f'{name}.{n}' if name else n for n, _ in children)
    inner = set(found)
    return [b for b in found if not any(o != b and o.startswith(b + '.') for o in inner)]


class _TimmLayout:
    """Stages and blocks of one timm model, in its module (= forward) order."""

    def __init__(self, model: nn.Module) -> None:
        order = [n for n, _ in model.named_modules()]
        self.index = {n: i for i, n in enumerate(order)}
        info = getattr(model, 'feature_info', None)
        info = getattr(info, 'info', info) or []
        self.levels: list[str] = []  # feature modules, resolved to this model's names
        self.reductions: list[int] = []
        for entry in info:
            name = self._resolve(entry['module'])
            if name is not None:
                self.levels.append(name)
                self.reductions.append(int(entry.get('reduction', 0)))
        self.level_end = [self._end(n) for n in self.levels]
        #: a first level at stride 2 is the stem's own output (ResNet's act1, EfficientNet's
        #: blocks.0): it is stage 0; otherwise the stem is 0 and the levels count from 1
        self.offset = 0 if self.reductions and self.reductions[0] <= 2 else 1
        self.blocks = _block_lists(model)
        if not self.blocks:  # no repeated blocks (RegNet's s1.b1...): each stage is a block
            self.blocks = [n for n in self.levels[1 - self.offset:]
                           if any(True for _ in model.get_submodule(n).parameters())]
        self.block_start = [self.index[b] for b in self.blocks]

    def _resolve(self, name: str) -> str | None:
        # features_only wrappers rename: FeatureListNet flattens 'stages.0' to 'stages_0',
        # FeatureGetterNet keeps the model as 'model'
        for cand in (name, name.replace('.', '_', 1), f'model.{name}'):
            if cand in self.index:
                return cand
        return None

    def _end(self, name: str) -> int:
        prefix = name + '.'
        return max(i for n, i in self.index.items() if n == name or n.startswith(prefix))

    def position(self, name: str) -> int:
        """Module index of the module holding parameter ``name`` (adapter tensors live in
        a submodule or beside the weight of the layer they adapt)."""
        module = name
        while module:
            module = module.rpartition('.')[0]
            if module in self.index:
                return self.index[module]
        return 0  # the root's own parameters (a ViT's cls_token, pos_embed) come first

    def level(self, pos: int) -> int | None:
        """Feature level of a module position; None after the last level (a classifier)."""
        for i, end in enumerate(self.level_end):
            if pos <= end:
                return i
        return None

    def stage_id(self, pos: int) -> int:
        if not self.levels or pos < self.index[self.levels[0]]:
            return 0
        return self.level(pos) + self.offset

    def block_id(self, pos: int) -> int:
        """1 + the last block that starts at or before ``pos``; 0 before the first."""
        return sum(1 for start in self.block_start if start <= pos)


@register_description('mmpretrain.models.backbones.timm_backbone.TIMMBackbone',
                      'mmseg.models.backbones.timm_backbone.TIMMBackbone')
class TIMMBackboneDescription(BackboneDescription):
    """mmpretrain's and mmseg's ``TIMMBackbone`` (the timm model in ``timm_model``), any timm
    model, plain or ``features_only``; its structure read from timm's own description, not
    from model names.

    Stages: timm's ``feature_info`` levels in order (``layer1``, ``stages.2``, ``blocks.4``,
    a ViT's ``blocks.N``); a parameter belongs to the first level that contains it or follows
    it. Blocks: the innermost lists of numbered, same-class modules (``layer1.0``,
    ``stages_0.blocks.1``, ``blocks.3.2``); a model without such lists has one block per level
    (the stem's level excepted).

    Layer ids. layer_wise: 0 before the first block (stem, patch embedding, class token,
    position embedding), block ``k`` in module order ``k + 1``, parameters between blocks
    (a ConvNeXt stage's downsample) with the block before them: on a ViT this is BEiT's rule.
    stage_wise: 0 for the stem (before the first level, and the first level itself when it is
    at stride 2, the stem's output), then one id per level. Parameters after the last level (a
    plain model's final norm and classifier) take the heads' id.
    """

    unit_patterns = ()
    decay_types = ('layer_wise', 'stage_wise')

    @cached_property
    def layout(self) -> _TimmLayout:
        return _TimmLayout(self.backbone.timm_model)

    def _local(self, name: str) -> str:
        return name[len('timm_model.'):] if name.startswith('timm_model.') else name

    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        self.check_decay_type(decay_type)
        layout = self.layout
        pos = layout.position(self._local(name))
        if layout.levels and layout.level(pos) is None:
            return num_layers + 1, False
        if decay_type == 'stage_wise':
            return layout.stage_id(pos), True
        return layout.block_id(pos), True

    def units(self) -> list[str]:
        return [f'timm_model.{b}' for b in self.layout.blocks]

    def stage_of(self, name: str) -> str:
        layout = self.layout
        local = self._local(name)
        pos = layout.index.get(local, layout.position(local))
        if not layout.levels or pos < layout.index[layout.levels[0]]:
            return 'stem'
        level = layout.level(pos)
        return 'other' if level is None else f'timm_model.{layout.levels[level]}'
