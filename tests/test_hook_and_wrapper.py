"""PEFTBackbone and FLoRAHook inside a real mmengine Runner."""
import copy
import glob
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.config import Config
from mmengine.registry import DATASETS
from mmengine.runner import Runner
from torch import nn

import flora_mm  # noqa: F401
from flora_mm.peft import (adapter_layers, adapter_state_dict, inject_adapters, injected_roots,
                           unexpected_trainable, update_norms)
from flora_mm.peft.io import load_adapter_checkpoint, read_adapter_info
from flora_mm.registry import MODELS

PEFT = {
    'FLoRA': dict(type='FLoRA', rank=4, kernel_rank=2, scale=1.0),
    'DoRA': dict(type='DoRA', rank=4),
    'BitFit': dict(type='BitFit'),
}


@MODELS.register_module(force=True)
class TinyClassifier(BaseModel):
    """A real mmengine model: backbone from the registry, a linear head."""

    def __init__(self, backbone: dict, num_classes: int = 3):
        super().__init__()
        self.backbone = MODELS.build(backbone)
        self.head = nn.Linear(self.backbone.out_channels[-1], num_classes)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        return logits


@DATASETS.register_module(force=True)
class TinyTensorDataset(torch.utils.data.Dataset):
    """16 seeded 32x32 images, 3 classes (one brighter): learnable in a few steps."""

    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = torch.arange(n) % 3
        self.images[self.labels == 1] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(inputs=self.images[i], labels=self.labels[i])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A ConvNeXt-V2-atto checkpoint in timm's layout, written by the test."""
    torch.manual_seed(123)
    model = timm.create_model('convnextv2_atto', pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp('ckpt') / 'convnextv2_atto_timm.pth'
    torch.save(model.state_dict(), path)
    # the backbone keeps no classifier head
    return str(path), {k: v for k, v in model.state_dict().items() if not k.startswith('head')}


def backbone_cfg(ckpt):
    return dict(type='ConvNeXtV2', arch='atto', out_indices=(3,),
                init_cfg=dict(type='Pretrained', checkpoint=ckpt))


def make_runner(work_dir, model_cfg, hook_cfg, max_iters=6, ckpt_interval=3):
    # built from a config, as tools/train.py does
    return Runner.from_cfg(Config(dict(
        model=model_cfg,
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=dict(type='TinyTensorDataset'), batch_size=4, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=5e-3, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0,
                              end=2)],
        custom_hooks=[hook_cfg],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=ckpt_interval,
                                           by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        visualizer=dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
        default_scope='mmengine',
        randomness=dict(seed=0),
    )))


def fresh_model(model_cfg, peft):
    model = MODELS.build(copy.deepcopy(model_cfg))
    model.init_weights()
    if peft is not None:
        inject_adapters(model.backbone, peft)
    return model.eval()


@pytest.mark.parametrize('method', list(PEFT))
def test_hook_injects_before_optimizer_and_saves_reloadable_adapters(method, pretrained,
                                                                     tmp_path):
    ckpt, plain_sd = pretrained
    model_cfg = dict(type='TinyClassifier', backbone=backbone_cfg(ckpt))
    runner = make_runner(tmp_path, model_cfg,
                         dict(type='FLoRAHook', peft=PEFT[method], parts=['backbone'],
                              norm_interval=2))
    runner.train()
    model = runner.model
    # the optimizer holds exactly the trainable tensors, adapters included: every trainable
    # tensor is in it, and no frozen one is
    in_optim = {id(p) for g in runner.optim_wrapper.optimizer.param_groups for p in g['params']}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and in_optim == trainable
    params = dict(model.named_parameters())
    assert {id(params[name]) for name in adapter_state_dict(model)} <= in_optim
    adapters = adapter_state_dict(model)
    assert adapters
    # the pretrained base weights were loaded AFTER injection and did not move
    state = model.backbone.state_dict()
    trained = set(adapter_state_dict(model.backbone))
    for key, value in plain_sd.items():
        if key not in trained:  # BitFit trains the biases
            assert torch.equal(state[key], value), key
    if method == 'FLoRA':
        assert all(layer.flora_core.abs().sum() > 0 for _, layer in adapter_layers(model))
    # adapter checkpoints next to the regular ones, much smaller
    for it in (3, 6):
        full = tmp_path / f'iter_{it}.pth'
        small = tmp_path / f'iter_{it}_adapter.safetensors'
        assert full.exists() and small.exists(), os.listdir(tmp_path)
        assert small.stat().st_size < full.stat().st_size / 4
    info = read_adapter_info(str(tmp_path / 'iter_6_adapter.safetensors'))
    assert info['methods']['backbone']['type'] == method
    # reloaded into a fresh model: identical outputs
    fresh = fresh_model(model_cfg, PEFT[method])
    load_adapter_checkpoint(fresh, str(tmp_path / 'iter_6_adapter.safetensors'))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # update norms per stage went to the visualizer
    if method != 'BitFit':
        scalars = glob.glob(str(tmp_path / '*' / 'vis_data' / 'scalars.json'))
        lines = [json.loads(line) for line in open(scalars[0])]
        keys = {k for line in lines for k in line}
        assert {'update_norm/stages.0', 'update_norm/stages.3'} <= keys


def test_wrapper_model_with_hook(pretrained, tmp_path):
    ckpt, plain_sd = pretrained
    model_cfg = dict(type='TinyClassifier',
                     backbone=dict(type='PEFTBackbone', backbone=backbone_cfg(ckpt),
                                   peft=PEFT['FLoRA']))
    runner = make_runner(tmp_path, model_cfg, dict(type='FLoRAHook', norm_interval=0))
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    runner.train()
    changed = {n for n, p in runner.model.named_parameters() if not torch.equal(p, before[n])}
    expected = set(adapter_state_dict(runner.model)) | {'head.weight', 'head.bias'}
    assert changed == expected
    # plain keys: the backbone's state dict is the plain one plus adapter tensors
    keys = set(runner.model.backbone.state_dict())
    assert set(plain_sd) <= keys
    assert all(('flora' in k) for k in keys - set(plain_sd) if not k.startswith('norm'))


def test_pretrained_loaded_after_injection_refreshes_dora(pretrained):
    ckpt, plain_sd = pretrained
    backbone = MODELS.build(dict(type='PEFTBackbone', backbone=backbone_cfg(ckpt),
                                 peft=PEFT['DoRA'], load_pretrained=False))
    layer = backbone.stages[0].blocks[0].conv_dw
    assert not torch.equal(layer.weight, plain_sd['stages.0.blocks.0.conv_dw.weight'])
    backbone.init_weights()  # as the Runner does after before_run
    assert torch.equal(layer.weight, plain_sd['stages.0.blocks.0.conv_dw.weight'])
    expected = plain_sd['stages.0.blocks.0.conv_dw.weight'].flatten(1).norm(dim=1)
    torch.testing.assert_close(layer.dora_magnitude.detach(), expected)


def test_hook_refuses_models_without_peft_and_wrong_trainable_sets(pretrained, tmp_path):
    ckpt, _ = pretrained
    model_cfg = dict(type='TinyClassifier', backbone=backbone_cfg(ckpt))
    runner = make_runner(tmp_path / 'a', model_cfg, dict(type='FLoRAHook'))
    with pytest.raises(RuntimeError, match='no PEFT method'):
        runner.train()
    model = fresh_model(model_cfg, PEFT['FLoRA'])
    assert unexpected_trainable(model) == ([], [])
    model.backbone.stem[0].weight.requires_grad_(True)
    extra, _ = unexpected_trainable(model)
    assert extra == ['backbone.stem.0.weight']
    with pytest.raises(ValueError, match='rank'):
        from flora_mm.engine import FLoRAHook
        FLoRAHook(peft=dict(type='FLoRA', rank=0))


def test_update_norms_match_delta_weights(pretrained):
    ckpt, _ = pretrained
    model = fresh_model(dict(type='TinyClassifier', backbone=backbone_cfg(ckpt)), PEFT['FLoRA'])
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.flora_core.normal_()
    norms = update_norms(model)
    expected = torch.stack([layer.delta_weight().pow(2).sum()
                            for name, layer in adapter_layers(model)
                            if 'stages.2' in name]).sum().sqrt()
    assert norms['stages.2'] == pytest.approx(expected.item(), rel=1e-5)
    assert [name for name, _, _ in injected_roots(model)] == ['backbone']
