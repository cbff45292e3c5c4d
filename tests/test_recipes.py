"""Every config family against the reference table of docs/recipes.md.

Each test loads a real leaf config, builds its model on the meta device (no weights, no
pretrained file) and its optimizer through the config's own constructor, and checks learning
rate and weight decay of every trainable tensor, the AMP dtype, the schedule length and the
method-group settings (drop path, auxiliary head, test stride) against the table below. The
expected per-tensor learning rate comes from mmdet's/mmseg's own layer-id functions
(tests/test_layer_decay.py), not from flora_mm's constructor.
"""
import copy

import flora_mm  # noqa: F401
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, DefaultScope

from flora_mm.peft import adapter_layers
from flora_mm.utils import register_task_modules
from tests.test_layer_decay import reference_layer_id

# The reference table (docs/recipes.md). amp: the autocast dtype (mmengine's AmpOptimWrapper
# without dtype autocasts to float16 on CUDA). decay: (type, rate, num_layers) for the methods
# that train the backbone; Frozen has InternVL's head-tuning rate 1.0 on InternViT.
FAMILIES = {
    'coco/convnextv2': dict(lr=1e-4, wd=0.05, decay=('layer_wise', 0.95, 12), amp='float16',
                            length=('max_epochs', 36), flora_scale=4.0),
    'ade20k/convnextv2': dict(lr=1e-4, wd=0.05, decay=('stage_wise', 0.9, 12), amp='float16',
                              length=('max_iters', 160000), stride=426, aux=(2, 256),
                              flora_scale=4.0),
    'dota/convnextv2': dict(lr=1e-4, wd=0.05, decay=('layer_wise', 0.95, 12), amp='float16',
                            length=('max_epochs', 12), flora_scale=4.0),
    'ade20k/internvit6b': dict(lr=4e-5, wd=0.05, decay=('layer_wise', 0.95, 48),
                               amp='bfloat16', length=('max_iters', 80000), stride=322,
                               aux=(2, 1536), frozen_aux_in_index=1, frozen_rate=1.0,
                               flora_scale=0.4),
}
# every method, two ranks (the leaves of one method differ only in rank)
METHODS = ['base', 'bitfit', 'full', 'lora_r8', 'lora_r32', 'dora_r16', 'flora_r8', 'flora_r32']


def _build(path):
    cfg = Config.fromfile(path)
    register_task_modules(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.load_pretrained = False  # no checkpoint here; meta tensors
    with DefaultScope.overwrite_default_scope(cfg.default_scope), torch.device('meta'):
        model = MODELS.build(model_cfg)
    return cfg, model


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_leaf_config_matches_reference_table(family, method):
    ref = FAMILIES[family]
    task, backbone = family.split('/')
    cfg, model = _build(f'configs/{task}/{backbone}_{method}.py')
    frozen = method == 'base'

    # AMP: never fp16 for InternViT-6B
    ow = copy.deepcopy(cfg.optim_wrapper)
    assert ow.type == 'AmpOptimWrapper'
    assert (ow.get('dtype') or 'float16') == ref['amp']
    assert ow.constructor == 'LayerDecayOptimWrapperConstructor'
    # schedule length, drop path, heads, test stride
    key, value = ref['length']
    assert cfg.train_cfg[key] == value
    assert cfg.model.backbone.backbone.drop_path_rate == (0.0 if frozen else 0.4)
    if 'stride' in ref:
        assert cfg.model.test_cfg.stride == (ref['stride'],) * 2
    if 'aux' in ref:
        in_index, channels = ref['aux']
        if frozen:
            in_index = ref.get('frozen_aux_in_index', in_index)
        assert (cfg.model.auxiliary_head.in_index,
                cfg.model.auxiliary_head.channels) == (in_index, channels)
    # method parametrisation
    layers = dict(adapter_layers(model.backbone))
    if method.startswith('flora'):
        assert {(m.scale, m.init) for m in layers.values()} == {(ref['flora_scale'], 'kaiming')}
    if method.startswith(('lora', 'dora')):
        rank = int(method.split('_r')[1])
        assert {m.scaling for m in layers.values()} == {8 / rank}

    # optimizer: per-tensor lr and weight decay, built on CPU (AmpOptimWrapper needs CUDA)
    ow.type = 'OptimWrapper'
    ow.pop('dtype', None)
    ow.pop('loss_scale', None)
    decay_type, rate, num_layers = ref['decay']
    if frozen:
        rate = ref.get('frozen_rate', rate)
    assert dict(ow.paramwise_cfg) == dict(decay_rate=rate, decay_type=decay_type,
                                          num_layers=num_layers)
    wrapper = build_optim_wrapper(model, ow)
    in_optim = {id(p): g for g in wrapper.optimizer.param_groups for p in g['params']}
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    assert set(in_optim) == set(trainable)
    kind = 'vit' if backbone == 'internvit6b' else decay_type
    for pid, (name, p) in trainable.items():
        layer_id = reference_layer_id(kind, name, num_layers)
        lr = ref['lr'] * rate ** (num_layers + 2 - layer_id - 1)
        wd = 0.0 if p.ndim == 1 or name.endswith('.bias') else ref['wd']
        assert in_optim[pid]['lr'] == pytest.approx(lr, rel=1e-12), name
        assert in_optim[pid]['weight_decay'] == wd, name
    backbone_lrs = {in_optim[pid]['lr'] for pid, (n, _) in trainable.items()
                    if n.startswith('backbone.') and not n.startswith(('backbone.norm',
                                                                       'backbone.up'))}
    if method in ('full', 'lora_r8', 'flora_r32'):  # decay reaches the adapted layers
        assert min(backbone_lrs) < ref['lr'] * rate ** 2
    if frozen:
        assert not backbone_lrs
