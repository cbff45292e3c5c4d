"""Backbone descriptions: found through the MRO, a safe default for undescribed backbones, and
a description registered from outside flora_mm reaching the engine (layer decay, FSDP units,
update-norm stages, modules_to_save) with no engine change."""
import re

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS
from torch import nn

import flora_mm  # noqa: F401
from flora_mm.engine.fsdp import shard_units
from flora_mm.engine.hooks.update_norm import described_stages
from flora_mm.models import (BackboneDescription, ConvNeXtV2, LayerDecayError, describe,
                             register_description)
from flora_mm.models.descriptions.base import _DESCRIPTIONS


class Stack(nn.Module):
    """A small stage/block backbone no flora_mm module knows."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)) for _ in range(2))
        self.out_norm = nn.BatchNorm2d(4)
        self.out_channels = [4]

    def forward(self, x):
        x = self.first(x)
        for stage in self.stages:
            for block in stage:
                x = x + block(x)
        return (self.out_norm(x),)


class Detector(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(4, 2)


def test_subclasses_find_their_description():
    class Mine(ConvNeXtV2):
        pass

    assert type(describe(ConvNeXtV2('atto'))).__name__ == 'ConvNeXtV2Description'
    assert type(describe(Mine('atto'))).__name__ == 'ConvNeXtV2Description'


def test_undescribed_backbone_gets_safe_defaults_and_clear_errors():
    description = describe(Stack())
    assert type(description) is BackboneDescription
    assert description.modules_to_save() == [] and description.export({}, {}) is None
    assert description.units() == []  # no usual container name: no per-block units
    assert description.stage_of('stages.1.0.weight') == 'stages.1'
    with pytest.raises(LayerDecayError, match=r'Stack .*register a description.*custom_keys'):
        description.layer_id('first.weight', 4, 'layer_wise')
    with pytest.raises(LayerDecayError, match='does not know the layers of Stack'):
        build_optim_wrapper(Detector(Stack()), dict(
            type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
            paramwise_cfg=dict(decay_rate=0.9, num_layers=4),
            optimizer=dict(type='AdamW', lr=1e-3)))
    assert shard_units(Detector(Stack())) == ['backbone']  # and a warning says why


@pytest.fixture
def described_stack():
    @register_description(f'{Stack.__module__}.{Stack.__qualname__}')
    class StackDescription(BackboneDescription):
        unit_patterns = (r'^stages\.\d+\.\d+$', r'^first$')
        stage_pattern = r'^(stages\.\d+)'
        decay_types = ('layer_wise',)

        def layer_id(self, name, num_layers, decay_type):
            self.check_decay_type(decay_type)
            if name.startswith('first.'):
                return 0, True
            m = re.match(r'^stages\.(\d+)\.(\d+)\.', name)
            if m is None:
                return num_layers + 1, False
            return 1 + 2 * int(m[1]) + int(m[2]), True

        def modules_to_save(self):
            return [r'^out_norm$']

    yield StackDescription
    del _DESCRIPTIONS[f'{Stack.__module__}.{Stack.__qualname__}']


def test_a_description_from_outside_reaches_the_engine(described_stack):
    MODELS.register_module(module=Stack, force=True)
    backbone = MODELS.build(dict(type='PEFTBackbone', backbone=dict(type='Stack'),
                                 peft=dict(type='FLoRA', rank=2)))
    # PEFTBackbone took the description's new modules: they train fully
    assert backbone.out_norm.weight.requires_grad
    model = Detector(backbone)
    optim = build_optim_wrapper(model, dict(
        type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(decay_rate=0.5, num_layers=4), optimizer=dict(type='AdamW', lr=1.0)))
    lr_of = {name: group['lr'] for group in optim.optimizer.param_groups
             for name in group['param_names']}
    # lr = decay_rate ** (num_layers + 2 - id - 1): first conv id 0, stages.1.1 id 4, heads id 5
    assert lr_of['backbone.first.flora_core'] == 0.5 ** 5
    assert lr_of['backbone.stages.1.1.flora_core'] == 0.5 ** 1
    assert lr_of['backbone.out_norm.weight'] == lr_of['head.weight'] == 1.0
    assert shard_units(model) == ['backbone.stages.0.0', 'backbone.stages.0.1',
                                  'backbone.stages.1.0', 'backbone.stages.1.1',
                                  'backbone.first', 'backbone']
    stage_of = described_stages(model)
    assert stage_of('backbone.stages.1.0') == 'stages.1' and stage_of('head') == 'other'
