"""LayerDecayOptimWrapperConstructor against the references' own layer-id functions.

The expected layer id of every parameter comes from mmdet's / mmseg's installed functions
(``get_layer_id_for_convnext``, ``get_stage_id_for_convnext``, ``get_layer_id_for_vit``, the
last equal to InternVL's BEiT rule), applied to the parameter's name translated to the layout
those functions parse (mmpretrain's ConvNeXt, BEiT's ``layers.N``). The learning rate and weight
decay then follow the references' formula, written out here.
"""
import re

import flora_mm  # noqa: F401
import pytest
import torch.nn as nn
from mmdet.engine.optimizers.layer_decay_optimizer_constructor import \
    get_layer_id_for_convnext
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmseg.engine.optimizers.layer_decay_optimizer_constructor import (
    get_layer_id_for_vit, get_stage_id_for_convnext)

from flora_mm.models import ConvNeXtV2, InternViT
from flora_mm.peft import inject_adapters
from flora_mm.utils import register_task_modules

BASE_LR, BASE_WD = 1e-3, 0.05


class Detector(nn.Module):
    """The part of a detector/segmentor the constructor sees: .backbone plus other modules."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Conv2d(width, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)


def to_mmpretrain(name: str) -> str:
    """timm ConvNeXt names -> mmpretrain's (downsample_layers.N, stages.S.B)."""
    name = re.sub(r'^backbone\.stem\.', 'backbone.downsample_layers.0.', name)
    name = re.sub(r'^backbone\.stages\.(\d+)\.downsample\.', r'backbone.downsample_layers.\1.',
                  name)
    return re.sub(r'^backbone\.stages\.(\d+)\.blocks\.(\d+)\.', r'backbone.stages.\1.\2.', name)


def reference_layer_id(kind: str, name: str, num_layers: int) -> int:
    if kind == 'layer_wise':  # mmdet: called with the config's num_layers
        return get_layer_id_for_convnext(to_mmpretrain(name), num_layers)
    if kind == 'stage_wise':  # mmseg: called with num_layers + 2
        return get_stage_id_for_convnext(to_mmpretrain(name), num_layers + 2)
    return get_layer_id_for_vit(re.sub(r'^backbone\.blocks\.', 'backbone.layers.', name),
                                num_layers + 2)


def check(model: nn.Module, kind: str, rate: float, num_layers: int) -> dict:
    decay_type = 'layer_wise' if kind == 'vit' else kind
    wrapper = build_optim_wrapper(model, dict(
        type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(decay_rate=rate, decay_type=decay_type, num_layers=num_layers),
        optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD)))
    seen = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            assert id(p) not in seen, 'a tensor in two groups'
            seen[id(p)] = (group['lr'], group['weight_decay'])
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == set(trainable), 'optimizer != trainable tensors'
    got = {}
    for pid, (name, p) in trainable.items():
        layer_id = reference_layer_id(kind, name, num_layers)
        lr = BASE_LR * rate ** (num_layers + 2 - layer_id - 1)
        wd = 0.0 if p.ndim == 1 or name.endswith('.bias') else BASE_WD
        assert seen[pid][0] == pytest.approx(lr, rel=1e-12), name
        assert seen[pid][1] == wd, name
        got[name] = seen[pid]
    return got


@pytest.mark.parametrize('kind,rate', [('layer_wise', 0.95), ('stage_wise', 0.9)])
@pytest.mark.parametrize('method', ['FLoRA', 'DoRA', 'Full'])
def test_convnext_decay_matches_mmdet_mmseg(kind, rate, method):
    backbone = ConvNeXtV2('atto')
    peft = dict(type=method, modules_to_save=[r'^norm\d$'])
    if method != 'Full':
        peft.update(rank=4, targets=dict(types=['Conv2d', 'Linear']))
    inject_adapters(backbone, peft)
    got = check(Detector(backbone, 320), kind, rate, num_layers=12)
    # adapter tensors share the lr of the layer they adapt; heads and new norms keep base lr
    if method == 'FLoRA':
        a = got['backbone.stages.2.blocks.4.mlp.fc1.flora_core'][0]
        assert a == got['backbone.stages.2.blocks.4.mlp.fc1.flora_factors.0'][0]
        assert a < got['backbone.norm2.weight'][0] == BASE_LR == got['head.weight'][0]
        assert got['backbone.stages.2.blocks.4.mlp.fc1.flora_core'][1] == BASE_WD
    if method == 'DoRA':  # the magnitude vector is 1-D: no weight decay, as in the references
        assert got['backbone.stages.0.blocks.0.mlp.fc1.dora_magnitude'][1] == 0.0


@pytest.mark.parametrize('method', ['LoRA', 'Full'])
def test_internvit_decay_matches_internvl(method):
    backbone = InternViT('tiny', img_size=56)
    peft = dict(type=method, modules_to_save=[r'^up\d$'])
    if method != 'Full':
        peft.update(rank=4, targets=dict(types=['Linear']))
    inject_adapters(backbone, peft)
    got = check(Detector(backbone, 64), 'vit', 0.95, num_layers=4)
    if method == 'Full':
        assert got['backbone.pos_embed'][1] == BASE_WD  # 3-D: decayed, as InternVL in effect
        assert got['backbone.blocks.0.ls1.gamma'][1] == 0.0
        assert got['backbone.patch_embed.proj.weight'][0] == pytest.approx(BASE_LR * 0.95 ** 5)
        assert got['backbone.up1.0.weight'][0] == BASE_LR


def test_frozen_parameters_stay_out_and_bad_configs_fail():
    backbone = InternViT('tiny', img_size=56)
    inject_adapters(backbone, dict(type='Frozen', modules_to_save=[r'^up\d$']))
    model = Detector(backbone, 64)
    got = check(model, 'vit', 0.9, num_layers=4)
    assert not any(n.startswith('backbone.blocks.') for n in got)

    def build(**paramwise):
        return build_optim_wrapper(model, dict(
            type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=paramwise, optimizer=dict(type='AdamW', lr=BASE_LR)))

    full = Detector(InternViT('tiny', img_size=56), 64)
    with pytest.raises(ValueError, match='num_layers=3 is too small'):
        build_optim_wrapper(full, dict(
            type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(decay_rate=0.9, num_layers=3),
            optimizer=dict(type='AdamW', lr=BASE_LR)))
    with pytest.raises(ValueError, match='layer_wise'):
        build(decay_rate=0.9, num_layers=4, decay_type='stage_wise')
    with pytest.raises(ValueError, match='custom_keys'):
        build(decay_rate=0.9, num_layers=4, custom_keys={})
    with pytest.raises(ValueError, match='decay_rate'):
        build(num_layers=4)
    with pytest.raises(ValueError, match='does not know the layers of Conv2d.*register a '
                       'description'):
        build_optim_wrapper(Detector(nn.Conv2d(3, 64, 1), 64), dict(
            type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(decay_rate=0.9, num_layers=4),
            optimizer=dict(type='AdamW', lr=BASE_LR)))


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmrotate'])
def test_constructor_found_from_every_task_scope(scope):
    register_task_modules(scope)
    import importlib
    registry = importlib.import_module(f'{scope}.registry').OPTIM_WRAPPER_CONSTRUCTORS
    with DefaultScope.overwrite_default_scope(scope):
        assert registry.get('LayerDecayOptimWrapperConstructor') is not None
