"""Backbones users bring x PEFT methods: one tiny model of each described OpenMMLab / timm
backbone (mmdet ResNet and SwinTransformer, mmpretrain ConvNeXt and VisionTransformer,
mmpretrain's and mmseg's TIMMBackbone on timm CNNs and a ViT), injected through PEFTBackbone.

For every pair: layer-decay param groups against the references' layer-id functions where they
exist (mmdet/mmseg ConvNeXt, mmseg ViT, mmpretrain's Swin ``get_layer_depth``) and against the
rules each description documents elsewhere; two SGD steps lower a toy loss; the adapter
checkpoint round-trips; merged outputs equal adapted ones; the meta-device count equals the
real one; FSDP units are the blocks. FLoRA and LoRA on every backbone, every method on one.
"""
from __future__ import annotations

import re

import flora_mm  # noqa: F401
import pytest
import torch
import torch.nn as nn
from mmdet.engine.optimizers.layer_decay_optimizer_constructor import \
    get_layer_id_for_convnext
from mmengine.optim import build_optim_wrapper
from mmpretrain.models.backbones.swin_transformer import SwinTransformer as PretrainSwin
from mmseg.engine.optimizers.layer_decay_optimizer_constructor import (
    get_layer_id_for_vit, get_stage_id_for_convnext)

from flora_mm.engine.fsdp import shard_units
from flora_mm.models import describe, meta_device
from flora_mm.peft import merge_adapters, remove_adapters
from flora_mm.peft.io import (load_adapter_checkpoint, save_adapter_checkpoint,
                              trainable_state_dict)
from flora_mm.registry import MODELS
from flora_mm.utils import register_task_modules

from ._methods import method_config, method_names, randomize_adapters

register_task_modules('mmdet')
register_task_modules('mmseg')
import mmpretrain.models  # noqa: E402,F401  (registers mmpretrain's backbones)

IMG = 32
BASE_LR, RATE = 1e-3, 0.9


# ----------------------------------------------------------------------------- references
def _resnet_ref(depths):
    first = [sum(depths[:i]) for i in range(len(depths))]

    def ref(name, num_layers, kind):
        m = re.match(r'backbone\.layer(\d+)\.(\d+)\.', name)
        if m is None:
            return 0
        stage = int(m[1])
        return stage if kind == 'stage_wise' else first[stage - 1] + int(m[2]) + 1
    return ref


def _swin_ref(depths):
    class Arch:  # mmpretrain's get_layer_depth reads .depths only
        pass
    arch = Arch()
    arch.depths = depths

    def ref(name, num_layers, kind):
        if kind == 'layer_wise':  # mmpretrain's Swin rule; its num_layers is sum(depths) + 2
            assert num_layers == sum(depths)
            return PretrainSwin.get_layer_depth(arch, name, 'backbone.')[0]
        m = re.match(r'backbone\.stages\.(\d+)\.', name)
        if name.startswith('backbone.patch_embed.'):
            return 0
        return int(m[1]) + 1 if m else num_layers + 1
    return ref


def _convnext_ref(name, num_layers, kind):
    if kind == 'layer_wise':  # mmdet: called with the config's num_layers
        return get_layer_id_for_convnext(name, num_layers)
    return get_stage_id_for_convnext(name, num_layers + 2)  # mmseg: with num_layers + 2


def _vit_ref(rename=None):
    def ref(name, num_layers, kind):
        for pattern, repl in rename or ():
            name = re.sub(pattern, repl, name)
        return get_layer_id_for_vit(name, num_layers + 2)
    return ref


def _prefix_ref(layer_rules, stage_rules):
    """ids by the first matching name regex (the layouts timm's feature_info gives)."""
    def ref(name, num_layers, kind):
        for pattern, value in (layer_rules if kind == 'layer_wise' else stage_rules):
            m = re.match(pattern, name)
            if m:
                return value(m) if callable(value) else value
        raise AssertionError(f'no rule for {name}')
    return ref


# ConvNeXt-atto (timm, features_only): stem_0/1, stages_S.downsample, stages_S.blocks.B
ATTO_DEPTHS = (1, 1, 2, 1)
_ATTO_FIRST = (0, 1, 2, 4)
_timm_convnext_ref = _prefix_ref(
    [(r'backbone\.timm_model\.stem_', 0),
     (r'backbone\.timm_model\.stages_(\d+)\.blocks\.(\d+)\.',
      lambda m: _ATTO_FIRST[int(m[1])] + int(m[2]) + 1),
     (r'backbone\.timm_model\.stages_(\d+)\.downsample\.',  # with the block before it
      lambda m: _ATTO_FIRST[int(m[1])])],
    [(r'backbone\.timm_model\.stem_', 0),
     (r'backbone\.timm_model\.stages_(\d+)\.', lambda m: int(m[1]) + 1)])
# MobileNetV3-small (timm, features_only): levels bn1 (stride 2), blocks.0, .1, .3, .5
_MBV3_FIRST = (0, 1, 3, 6, 8, 11)
_timm_mobilenet_ref = _prefix_ref(
    [(r'backbone\.timm_model\.(conv_stem|bn1)\.', 0),
     (r'backbone\.timm_model\.blocks\.(\d+)\.(\d+)\.',
      lambda m: _MBV3_FIRST[int(m[1])] + int(m[2]) + 1)],
    [(r'backbone\.timm_model\.(conv_stem|bn1)\.', 0),
     (r'backbone\.timm_model\.blocks\.(\d+)\.', lambda m: (1, 2, 3, 3, 4, 4)[int(m[1])])])


# ----------------------------------------------------------------------------- backbones
SWIN_DEPTHS = (1, 2, 1, 1)
CASES = {
    'mmdet.ResNet': dict(
        cfg=dict(type='mmdet.ResNet', depth=18, base_channels=8, out_indices=(0, 1, 2, 3)),
        ref=_resnet_ref((2, 2, 2, 2)), num_layers=dict(layer_wise=8, stage_wise=4),
        units=[rf'layer{s}\.{b}' for s in range(1, 5) for b in range(2)]),
    'mmdet.SwinTransformer': dict(
        cfg=dict(type='mmdet.SwinTransformer', embed_dims=16, depths=SWIN_DEPTHS,
                 num_heads=(1, 1, 2, 2), window_size=4, drop_path_rate=0.1,
                 out_indices=(1, 2, 3)),
        ref=_swin_ref(SWIN_DEPTHS), num_layers=dict(layer_wise=5, stage_wise=4),
        units=[r'patch_embed'] + [rf'stages\.{s}\.blocks\.{b}'
                                  for s, d in enumerate(SWIN_DEPTHS) for b in range(d)]),
    'mmpretrain.ConvNeXt': dict(
        cfg=dict(type='mmpretrain.ConvNeXt', arch=dict(depths=[2, 2, 6, 2],
                                                        channels=[8, 16, 32, 64]),
                 out_indices=(0, 1, 2, 3), gap_before_final_norm=False, drop_path_rate=0.1),
        ref=_convnext_ref, num_layers=dict(layer_wise=6, stage_wise=4),
        units=[r'downsample_layers\.0'] + [rf'stages\.{s}\.{b}' for s, d in
                                            enumerate((2, 2, 6, 2)) for b in range(d)]),
    'mmpretrain.VisionTransformer': dict(
        cfg=dict(type='mmpretrain.VisionTransformer', img_size=IMG, patch_size=8,
                 arch=dict(embed_dims=32, num_layers=4, num_heads=2, feedforward_channels=64),
                 out_indices=(1, 3), out_type='featmap', drop_path_rate=0.1),
        ref=_vit_ref(), num_layers=dict(layer_wise=4),
        units=[r'patch_embed'] + [rf'layers\.{i}' for i in range(4)]),
    'mmseg.TIMMBackbone(convnext_atto)': dict(
        cfg=dict(type='mmseg.TIMMBackbone', model_name='convnext_atto', pretrained=False,
                 features_only=True, depths=ATTO_DEPTHS, dims=(8, 16, 32, 64),
                 drop_path_rate=0.1),
        ref=_timm_convnext_ref, num_layers=dict(layer_wise=5, stage_wise=4),
        units=[rf'timm_model\.stages_{s}\.blocks\.{b}' for s, d in enumerate(ATTO_DEPTHS)
               for b in range(d)]),
    'mmpretrain.TIMMBackbone(mobilenetv3)': dict(
        cfg=dict(type='mmpretrain.TIMMBackbone', model_name='mobilenetv3_small_050',
                 features_only=True),
        ref=_timm_mobilenet_ref, num_layers=dict(layer_wise=12, stage_wise=4),
        units=[rf'timm_model\.blocks\.{s}\.{b}' for s, d in enumerate((1, 2, 3, 2, 3, 1))
               for b in range(d)]),
    'mmpretrain.TIMMBackbone(vit)': dict(
        cfg=dict(type='mmpretrain.TIMMBackbone', model_name='vit_tiny_patch16_224',
                 features_only=True, img_size=IMG, depth=3, embed_dim=32, num_heads=2,
                 out_indices=(1, 2)),
        # BEiT's rule on timm's names: the ViT sits in FeatureGetterNet's .model
        ref=_vit_ref([(r'^backbone\.timm_model\.model\.blocks\.', 'backbone.layers.'),
                      (r'^backbone\.timm_model\.model\.', 'backbone.')]),
        num_layers=dict(layer_wise=3, stage_wise=3),
        units=[rf'timm_model\.model\.blocks\.{i}' for i in range(3)]),
}
ALL_METHODS_ON = 'mmpretrain.ConvNeXt'
PAIRS = ([(b, m) for b in CASES for m in ('FLoRA', 'LoRA')]
         + [(ALL_METHODS_ON, m) for m in method_names() if m not in ('FLoRA', 'LoRA')])


class Wrapper(nn.Module):
    """What the optimizer constructor and the sharding see: ``.backbone`` plus a head."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(4, 4)


def build(case: str, method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    peft = method_config(method, rank=2, targets=dict(types=['Conv2d', 'Linear']))
    return MODELS.build(dict(type='PEFTBackbone', backbone=dict(CASES[case]['cfg']), peft=peft,
                             load_pretrained=False))


def features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = backbone(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def counts(module: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in module.parameters()),
            sum(p.numel() for p in module.parameters() if p.requires_grad))


def check_layer_decay(case: str, model: Wrapper) -> None:
    spec = CASES[case]
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    for kind, num_layers in spec['num_layers'].items():
        wrapper = build_optim_wrapper(model, dict(
            type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(decay_rate=RATE, decay_type=kind, num_layers=num_layers),
            optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=0.05)))
        seen = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
        assert set(seen) == set(trainable), 'optimizer != trainable tensors'
        for pid, (name, p) in trainable.items():
            if name.startswith('head.'):
                layer_id = num_layers + 1
            else:
                # an adapter tensor takes the id of the layer it adapts
                layer = re.sub(r'\.(flora_core|flora_factors\.\d+|lora_A|lora_B|'
                               r'dora_magnitude)$', '.weight', name)
                layer_id = spec['ref'](layer, num_layers, kind)
            expected = BASE_LR * RATE ** (num_layers + 1 - layer_id)
            assert seen[pid] == pytest.approx(expected, rel=1e-12), (kind, name, layer_id)


@pytest.mark.parametrize('case,method', PAIRS, ids=[f'{b}-{m}' for b, m in PAIRS])
def test_backbone_matrix(case, method, tmp_path):
    spec = CASES[case]
    backbone = build(case, method)
    model = Wrapper(backbone)

    # meta-device count == real count, and no parameter holds memory
    with meta_device():
        meta = build(case, method)
    assert counts(meta) == counts(backbone)
    assert {p.device.type for p in meta.parameters()} == {'meta'}

    # FSDP units: the blocks (and stem / patch embedding) the description names
    units = shard_units(model)
    assert units[-1] == 'backbone'
    got = sorted(u[len('backbone.'):] for u in units[:-1])
    assert len(got) == len(spec['units']), got
    for pattern in spec['units']:
        assert any(re.fullmatch(pattern, u) for u in got), (pattern, got)

    # layer-wise / stage-wise decay: the references' ids
    check_layer_decay(case, model)

    x = torch.randn(1, 3, IMG, IMG)
    backbone.eval()
    # two SGD steps lower a toy loss (eval mode: no drop path, fixed norm statistics)
    if any(p.requires_grad for p in backbone.parameters()):
        with torch.no_grad():
            targets = [torch.randn_like(f) for f in features(backbone, x)]
        optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def loss_fn():
            return sum(nn.functional.mse_loss(f, t)
                       for f, t in zip(features(backbone, x), targets))
        losses = []
        for _ in range(2):
            optim.zero_grad()
            loss = loss_fn()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(loss_fn().item())
        assert losses[-1] < losses[0], losses

    # adapter checkpoint round trip into a fresh build of the same base weights
    backbone = build(case, method)
    randomize_adapters(backbone, seed=1)  # a non-zero update, here and in the merge below
    path = str(tmp_path / 'adapter.safetensors')
    save_adapter_checkpoint(backbone, path)
    other = build(case, method)
    load_adapter_checkpoint(other, path)
    saved, loaded = trainable_state_dict(backbone), trainable_state_dict(other)
    assert saved.keys() == loaded.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0)
    backbone.eval(), other.eval()
    with torch.no_grad():
        for a, b in zip(features(backbone, x), features(other, x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # merged (and removed) adapters give the adapted outputs
    with torch.no_grad():
        adapted = features(backbone, x)
        merge_adapters(backbone)
        merged = features(backbone, x)
        remove_adapters(backbone)
        plain = features(backbone, x)
    for a, m, p in zip(adapted, merged, plain):
        tol = 1e-5 * a.abs().max().item()  # fp32 rounding of the merged weights
        torch.testing.assert_close(m, a, rtol=1e-4, atol=tol)
        torch.testing.assert_close(p, a, rtol=1e-4, atol=tol)


def test_meta_device_skips_value_writes_but_not_flags_or_shapes():
    """Initialisers on meta tensors are skipped (they have no values); what changes a tensor's
    flags or shape still happens, and the ranges stay readable on the CPU."""
    import timm.layers
    with meta_device():
        weight = nn.Parameter(torch.empty(4, 3))
        assert timm.layers.trunc_normal_(weight, std=0.02) is weight
        assert weight.uniform_(-1, 1).mul_(2).clamp_(-1, 1) is weight
        frozen = torch.empty(2, 2).requires_grad_(True)
        grown = torch.empty(2).resize_(5)
        schedule = torch.linspace(0, 0.1, 3)
    assert weight.is_meta and frozen.is_meta and frozen.requires_grad
    assert grown.shape == (5,) and grown.is_meta
    assert schedule.device.type == 'cpu' and schedule[-1].item() == pytest.approx(0.1)
    cpu = torch.zeros(2).add_(1)  # outside the context, values are written again
    assert cpu.tolist() == [1.0, 1.0]


def test_descriptions_by_mro_and_path():
    """ResNetV1d / ResNeXt find ResNet's description through the MRO (their modules register
    nothing of their own); the plain stem stays in the backbone's unit, the deep one is a unit;
    both TIMMBackbone classes share one description."""
    from mmdet.models.backbones import ResNet, ResNetV1d, ResNeXt, SwinTransformer
    from mmpretrain.models.backbones import TIMMBackbone
    from flora_mm.models.descriptions.openmmlab import (ResNetDescription,
                                                        TIMMBackboneDescription)
    with meta_device():
        v1d = ResNetV1d(depth=18)
        resnext = ResNeXt(depth=50, groups=4, base_width=4)
        timm_plain = TIMMBackbone('resnet18')  # not features_only: the classifier is a head
    assert type(describe(v1d)) is ResNetDescription
    assert type(describe(resnext)) is ResNetDescription
    assert 'stem' in describe(v1d).units()
    assert describe(ResNet(depth=18)).units()[0] == 'layer1.0'
    assert describe(resnext).layer_id('layer3.5.conv2.weight', 16, 'layer_wise') == (13, True)
    swin = describe(SwinTransformer(embed_dims=16, depths=(1, 2), num_heads=(1, 1),
                                    use_abs_pos_embed=True, pretrain_img_size=IMG,
                                    out_indices=(1,)))
    assert swin.layer_id('absolute_pos_embed', 3, 'layer_wise') == (0, True)
    assert swin.layer_id('stages.0.downsample.reduction.weight', 3, 'layer_wise') == (1, True)
    assert swin.modules_to_save() == [r'^norm1$']
    desc = describe(timm_plain)
    assert type(desc) is TIMMBackboneDescription
    assert desc.layer_id('timm_model.fc.weight', 8, 'layer_wise') == (9, False)
    assert desc.layer_id('timm_model.layer2.1.conv1.weight', 8, 'layer_wise') == (4, True)
    assert desc.stage_of('timm_model.layer3.0.conv1') == 'timm_model.layer3'
    assert desc.stage_of('timm_model.conv1') == 'stem'
