"""Mask R-CNN (mmdet), UperNet (mmseg) and Oriented R-CNN le90 (mmrotate), each with
ConvNeXt-V2-atto and the tiny InternViT behind PEFTBackbone, under every method: one loss step
on a real batch of the tiny data, and exactly the intended trainable set."""
import copy

import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATASETS, MODELS

from flora_mm.peft import adapter_state_dict, injected_roots

from ._methods import method_table
from .conftest import loss_backward, register_scope, tiny_config

TARGETS = dict(types=['Conv2d', 'Linear'])
# every registered method (tests/_methods.py)
METHODS = method_table(rank=4, second=2, targets=TARGETS, settings=dict(FLoRA=dict(scale=4.0)))
TASKS = {'coco': 'mmdet', 'ade20k': 'mmseg', 'dota': 'mmrotate'}


def use_internvit(cfg, task, tiny_root):
    """Swap the backbone for the tiny InternViT (4 levels of 64 channels from its simple FPN)."""
    cfg.model.backbone.backbone = dict(
        type='InternViT', arch='tiny', out_indices=(0, 1, 2, 3), with_fpn=True, with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=f'{tiny_root}/checkpoints/internvit_tiny.pth'))
    if task == 'ade20k':
        cfg.model.decode_head.in_channels = [64] * 4
        cfg.model.auxiliary_head.in_channels = 64
        cfg.model.data_preprocessor.size = (112, 140)  # multiples of the 14-pixel patch
    else:
        cfg.model.neck.in_channels = [64] * 4
        cfg.model.data_preprocessor.pad_size_divisor = 224  # multiple of 14 and of 32


def build(task, backbone, method, tiny_root):
    cfg = tiny_config(task, tiny_root)
    register_scope(TASKS[task])
    cfg.model.backbone.peft = copy.deepcopy(METHODS[method])
    if backbone == 'internvit':
        use_internvit(cfg, task, tiny_root)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    return model, pseudo_collate([dataset[0], dataset[1]])


@pytest.mark.parametrize('method', list(METHODS))
@pytest.mark.parametrize('backbone', ['convnextv2', 'internvit'])
@pytest.mark.parametrize('task', list(TASKS))
def test_one_loss_step_and_trainable_set(task, backbone, method, tiny_root):
    model, batch = build(task, backbone, method, tiny_root)
    assert [name for name, _, _ in injected_roots(model)] == ['backbone']
    chosen = {f'backbone.{k}' for k in adapter_state_dict(model.backbone)}
    backbone_params = {f'backbone.{n}' for n, _ in model.backbone.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # backbone: exactly the method's tensors (and the new, not pretrained, output layers)
    assert trainable & backbone_params == chosen
    saved = {n for n in backbone_params if n.split('.')[1].startswith(('norm', 'up'))}
    assert saved <= chosen
    if method == 'Frozen':
        assert chosen == saved
    if method == 'Full':
        assert chosen == backbone_params
    # neck and heads: everything trains
    assert {n for n, _ in model.named_parameters()} - backbone_params <= trainable
    loss_backward(model, batch)
    for name, param in model.named_parameters():
        if name in backbone_params and name not in chosen:
            assert param.grad is None, name
    with_grad = {n for n, p in model.named_parameters() if n in chosen and p.grad is not None}
    assert with_grad == chosen
