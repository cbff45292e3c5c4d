"""Configs for the backbones users bring (ResNet-50, Swin-T, a timm model), as shipped.

Real-size leaf configs: each loads, is the package's own recipe file except for the backbone
(compared key by key with the recipe it inherits), keeps the recipe's optimizer (no layer
decay), and builds its model on the CPU with random weights (no pretrained file; mmdet's Swin
and timm's ConvNeXt cannot be built on the meta device). In the built model the method reaches
every Conv2d and Linear it targets, and only adapter tensors (PEFT) or the recipe's trainable
backbone tensors (Full) train in the backbone, next to the heads.

Tiny twins: each trains (one iteration) and tests with the tools (flora_mm.cli.train / test:
their ``main``, in this process) on the generated tiny data, and the adapters change.
"""
import copy
import os
import re

import flora_mm  # noqa: F401
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, DefaultScope
from torch import nn

from flora_mm.apis import merge
from flora_mm.cli import test as cli_test
from flora_mm.cli import train as cli_train
from flora_mm.models import describe
from flora_mm.peft import adapter_layers, unexpected_trainable
from flora_mm.utils import register_task_modules

from .conftest import ROOT, tiny_config

RESNET_FROZEN = [r'^conv1$', r'^layer1\.']  # frozen_stages=1: stem and stage 1
# leaf config -> backbone kind; RECIPES: the package recipe each family inherits
REAL = {
    'coco/r50_flora_r16': 'resnet',
    'coco/r50_lora_r16': 'resnet',
    'coco/r50_full': 'resnet',
    'coco/swin-t_flora_r16': 'swin',
    'coco/swin-t_lora_r16': 'swin',
    'coco/swin-t_full': 'swin',
    'ade20k/swin-t_flora_r16': 'swin',
    'ade20k/swin-t_lora_r16': 'swin',
    'ade20k/timm-convnext-t_flora_r16': 'timm',
    'dota/r50_flora_r16': 'resnet',
    'dota/r50_lora_r16': 'resnet',
}
RECIPES = {
    'coco/r50': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    'coco/swin-t': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    'ade20k/swin-t': 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
                     'ade20k-512x512.py',
    'ade20k/timm-convnext-t': 'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-'
                              '512x512.py',
    'dota/r50': 'mmrotate::oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py',
}
# keys a leaf may set beyond its recipe; everything else must be the recipe's
OWN_KEYS = {'custom_imports', 'custom_hooks', 'pretrained', 'flora_scale', 'peft_exclude'}
ADAPTER_PREFIXES = {'FLoRA': ('flora_',), 'LoRA': ('lora_',)}


def _without(d: dict, *paths: str) -> dict:
    d = copy.deepcopy(d)
    for path in paths:
        *parents, last = path.split('.')
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return d


def _build(cfg: Config) -> nn.Module:
    register_task_modules(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.load_pretrained = False
    inner = model_cfg.backbone.backbone
    if inner.type.endswith('TIMMBackbone'):  # timm loads in __init__: no file here
        inner.pretrained = False
        inner.pop('pretrained_cfg_overlay')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(model_cfg)


@pytest.mark.parametrize('leaf', sorted(REAL))
def test_real_config_is_the_recipe_with_peft(leaf):
    kind = REAL[leaf]
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', f'{leaf}.py'))
    recipe = Config.fromstring(f"_base_ = '{RECIPES[leaf.split('_')[0]]}'", '.py')
    method = cfg.model.backbone.peft.type

    # the recipe as it is, apart from the backbone (and, for timm, heads' channels and the
    # optimizer, whose layer decay does not know TIMMBackbone)
    ours, theirs = cfg.to_dict(), recipe.to_dict()
    skip = ['model.backbone']
    if kind == 'timm':
        skip += ['model.decode_head.in_channels', 'model.auxiliary_head.in_channels',
                 'optim_wrapper']
    assert set(ours) - set(theirs) <= OWN_KEYS, set(ours) - set(theirs)
    for key in set(theirs) - OWN_KEYS:
        assert _without({key: ours[key]}, *skip) == _without({key: theirs[key]}, *skip), key
    assert cfg.custom_imports.imports == ['flora_mm']
    assert [h.type for h in cfg.custom_hooks] == ['FLoRAHook']
    assert cfg.model.backbone.type == 'PEFTBackbone'
    inner, ref = cfg.model.backbone.backbone, recipe.model.backbone
    if kind == 'timm':
        assert (inner.model_name, inner.features_only) == ('convnext_tiny', True)
        assert cfg.model.decode_head.in_channels == [96, 192, 384, 768]
        ow = cfg.optim_wrapper
        assert (ow.type, ow.optimizer.type, ow.optimizer.lr, ow.optimizer.weight_decay) == (
            recipe.optim_wrapper.type, 'AdamW', recipe.optim_wrapper.optimizer.lr,
            recipe.optim_wrapper.optimizer.weight_decay)
        # the recipe's own decay values, through flora_mm's constructor
        assert ow.constructor == 'LayerDecayOptimWrapperConstructor'
        assert ow.paramwise_cfg == recipe.optim_wrapper.paramwise_cfg
    else:
        # the package's backbone dict, with a local pretrained file
        assert _without(inner, 'init_cfg') == _without(ref, 'init_cfg', '_delete_'), leaf
        assert inner.init_cfg.checkpoint.startswith('checkpoints/')
        assert 'LayerDecay' not in cfg.optim_wrapper.get('constructor', '')
    if kind == 'resnet':
        assert inner.norm_eval is True and inner.frozen_stages == 1
        assert cfg.optim_wrapper.optimizer.type == 'SGD'
    if kind == 'swin':
        assert cfg.optim_wrapper.optimizer.type == 'AdamW'
        assert set(cfg.optim_wrapper.paramwise_cfg.custom_keys) == {
            'absolute_pos_embed', 'relative_position_bias_table', 'norm'}

    # the built model: what trains
    model = _build(cfg)
    model.train()  # ResNet freezes its frozen stages and puts BN in eval mode here
    backbone = model.backbone
    excluded = RESNET_FROZEN if kind == 'resnet' else []
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    if method == 'Full':
        stem_norm = [r'^bn1$'] if kind == 'resnet' else []  # frozen with the stem
        expected = {n for n, _ in backbone.named_parameters()
                    if not any(re.search(p, n.rsplit('.', 1)[0]) for p in excluded + stem_norm)}
        assert trainable == expected
    else:
        layers = dict(adapter_layers(backbone))
        kinds = {layer.kind for layer in layers.values()}
        assert kinds == ({'Conv2d'} if kind == 'resnet' else {'Conv2d', 'Linear'}), kinds
        # every conv and linear the method targets carries an adapter; the rest is excluded
        plain = [n for n, m in backbone.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all(any(re.search(p, n) for p in excluded) for n in plain), plain[:5]
        if kind == 'resnet':
            assert len(layers) == 42 and plain  # 53 convs, 11 in the stem and stage 1
        # only adapter tensors (`<layer>.flora_core`, `<layer>.flora_factors.N`, `.lora_A`)
        # and the modules the pretrained checkpoint lacks (Swin's output norms), which the
        # backbone's description names
        prefixes = ADAPTER_PREFIXES[method]
        new = [p for p in describe(backbone).modules_to_save()]
        assert trainable and all(any(part.startswith(prefixes) for part in n.split('.'))
                                 or any(re.search(p, n.rsplit('.', 1)[0]) for p in new)
                                 for n in trainable), sorted(trainable)[:5]
        assert (kind == 'swin') == bool(new)
        assert unexpected_trainable(model) == ([], [])
    if kind == 'resnet':
        norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)  # norm_eval
        if method != 'Full':
            assert not any(p.requires_grad for m in norms for p in m.parameters())
    heads = [(n, p) for n, p in model.named_parameters() if not n.startswith('backbone.')]
    assert heads and all(p.requires_grad for _, p in heads)

    # the recipe's optimizer takes every trainable tensor
    ow = copy.deepcopy(cfg.optim_wrapper)
    ow.type = 'OptimWrapper'  # AmpOptimWrapper needs CUDA
    ow.pop('loss_scale', None)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        wrapper = build_optim_wrapper(model, ow)
    in_optim = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    # (mmengine's constructor without paramwise_cfg hands the optimizer model.parameters(),
    # frozen ones included: they get no gradient, so no step)
    assert {id(p) for p in model.parameters() if p.requires_grad} <= set(in_optim)
    assert type(wrapper.optimizer).__name__ == cfg.optim_wrapper.optimizer.type
    if kind == 'timm':  # the recipe's stage-wise decay over timm's feature_info stages
        assert len({g['lr'] for g in wrapper.optimizer.param_groups if g['params']}) >= 4
    if kind != 'resnet':  # no weight decay on norms (Swin's custom_keys; timm: 1-D tensors)
        for n, p in model.named_parameters():
            if p.requires_grad and n.startswith('backbone.') and 'norm' in n:
                assert in_optim[id(p)]['weight_decay'] == 0.0, n


# ------------------------------------------------------------------------------ tiny twins
TWINS = {
    'coco/tiny/r50_flora_r16': ('coco/bbox_mAP', 'coco/segm_mAP'),
    'coco/tiny/swin-t_flora_r16': ('coco/bbox_mAP', 'coco/segm_mAP'),
    'ade20k/tiny/swin-t_flora_r16': ('mIoU',),
    'ade20k/tiny/timm-convnext-t_flora_r16': ('mIoU',),
    'dota/tiny/r50_flora_r16': ('dota/mAP',),
}


@pytest.mark.parametrize('twin', sorted(TWINS))
def test_tiny_twin_trains_and_tests_with_the_tools(twin, tiny_root, tmp_path, monkeypatch,
                                                   request):
    if twin.startswith('dota'):
        request.getfixturevalue('dota_metric_in_threads')
    cfg = tiny_config(f'configs/{twin}.py', tiny_root)
    inner = cfg.model.backbone.backbone
    assert inner.get('init_cfg') is None and not inner.get('pretrained')  # random weights
    path = tmp_path / 'config.py'
    cfg.dump(str(path))
    # one training iteration (4 of the 8 tiny images, batch 4); validation left to test.py
    if 'max_epochs' in cfg.train_cfg:
        schedule, ckpt = ['train_cfg.max_epochs=1'], tmp_path / 'epoch_1.pth'
    else:
        schedule, ckpt = ['train_cfg.max_iters=1'], tmp_path / 'iter_1.pth'
    schedule += ['train_dataloader.dataset.indices=4', 'default_hooks.checkpoint.interval=1',
                 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
                 'randomness.seed=0']  # random init: the same weights every run
    options = ['test_dataloader.dataset.indices=2']  # (two of the four test images)
    if twin.startswith(('coco', 'dota')):
        # two iterations clear no 0.05 score threshold: keep every detection to score
        options.append('model.test_cfg.rcnn.score_thr=0.0')
    cli_train.main([str(path), '--work-dir', str(tmp_path), '--cfg-options', *schedule,
                    *options])
    assert ckpt.is_file() and ckpt.with_name(ckpt.stem + '_adapter.safetensors').is_file()
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    cores = [v for k, v in state.items() if k.startswith('backbone.') and 'flora_core' in k]
    assert cores and any(v.abs().sum() > 0 for v in cores)  # FLoRA's cores start at zero
    metrics = {}
    run_test = cli_test.test
    monkeypatch.setattr(cli_test, 'test',
                        lambda *args, **kwargs: metrics.update(run_test(*args, **kwargs)))
    cli_test.main([str(path), str(ckpt), '--work-dir', str(tmp_path / 'test'),
                   '--cfg-options', *options])
    for key in TWINS[twin]:
        assert key in metrics, sorted(metrics)
    # merged into plain weights, written with a config plain OpenMMLab builds and loads
    summary = merge(str(path), str(ckpt), str(tmp_path / 'merged.pth'))
    assert summary['verify_error'] < 1e-4 and summary['merged_layers'] > 0
    merged = Config.fromfile(str(tmp_path / 'merged.py'))
    assert 'flora_mm' not in merged.get('custom_imports', {}).get('imports', [])
    assert not merged.model.backbone.get('pretrained')  # it holds every weight itself
    with DefaultScope.overwrite_default_scope(merged.default_scope):
        model = MODELS.build(merged.model)
    sd = torch.load(tmp_path / 'merged.pth', map_location='cpu', weights_only=True)['state_dict']
    model.load_state_dict(sd, strict=True)
