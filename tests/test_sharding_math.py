"""Single-process checks of the sharding helpers: closed-form update norms, shard-decomposable
checksums, and the memory planner against an independent count of a real model and optimizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import flora_mm  # noqa: F401
from flora_mm.apis.memory import optimizer_states_per_element, plan_model, shard_numel
from flora_mm.dist import checksums, partial_checksum
from flora_mm.models import ConvNeXtV2, InternViT
from flora_mm.peft import adapter_layers, inject_adapters
from flora_mm.peft.flora import flora_sq_norm, tucker_product
from flora_mm.peft.lora import lora_sq_norm
from flora_mm.peft.norms import update_sq_norm

from ._methods import adapter_methods, method_config


# --------------------------------------------------------------------------- norms
@pytest.mark.parametrize('shape,ranks', [((12, 7), (3, 5)), ((8, 4, 3, 3), (4, 2, 2, 1)),
                                         ((16, 1, 7, 7), (5, 1, 2, 2)), ((6, 5, 3), (2, 3, 2))])
def test_flora_closed_form_norm_equals_materialised(shape, ranks):
    gen = torch.Generator().manual_seed(sum(shape))
    core = torch.randn(ranks, generator=gen, dtype=torch.float64)
    factors = [torch.randn(i, j, generator=gen, dtype=torch.float64)
               for i, j in zip(shape, ranks)]
    dense = 0.37 * tucker_product(core, factors)
    assert dense.shape == shape
    closed = flora_sq_norm(core, factors, 0.37)
    assert float(closed) == pytest.approx(float(dense.float().pow(2).sum()), rel=1e-5)


def test_lora_closed_form_norm_equals_materialised():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=gen), torch.randn(9, 4, generator=gen)
    assert float(lora_sq_norm(a, b, 2.5)) == pytest.approx(
        float((2.5 * b @ a).pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize('method', adapter_methods())
def test_update_sq_norm_every_layer(method):
    """Closed forms (FLoRA, LoRA, ...) and the materialising fallback (DoRA) alike."""
    torch.manual_seed(0)
    model = ConvNeXtV2(arch='atto')
    inject_adapters(model, method_config(method, rank=4, second=2))
    with torch.no_grad():  # move the adapters away from their zero-update init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    layers = list(adapter_layers(model))
    assert layers
    for name, layer in layers:
        with torch.no_grad():
            expected = float(layer.delta_weight().float().pow(2).sum())
        assert expected > 0
        assert float(update_sq_norm(layer)) == pytest.approx(expected, rel=1e-4), name


# --------------------------------------------------------------------------- checksums
def test_checksum_is_shard_decomposable_and_detects_changes():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(37, 11, generator=gen).to(dtype)
        whole = partial_checksum(t, 0)
        for world in (2, 3, 5):  # torch.chunk pieces at their global offsets, summed mod 2**64
            total = torch.zeros(2, dtype=torch.int64)
            start = 0
            for piece in t.chunk(world, dim=0):
                total += partial_checksum(piece, start * t.shape[1])
                start += piece.shape[0]
            assert torch.equal(total, whole), (dtype, world)
        changed = t.clone()
        changed.view(-1)[123] = changed.view(-1)[123] + 1  # one element
        assert not torch.equal(partial_checksum(changed, 0)[0], whole[0])
        swapped = t.clone().view(-1)
        swapped[[3, 4]] = swapped[[4, 3]]
        if not torch.equal(swapped[3], swapped[4]):
            assert not torch.equal(partial_checksum(swapped.view_as(t), 0), whole)
    sums = checksums({'a': torch.ones(3), 'b': torch.zeros(2), 'm': torch.empty(2, device='meta')})
    assert set(sums) == {'a', 'b'} and sums['a'] != sums['b']


# --------------------------------------------------------------------------- planner
def _independent_count(model: nn.Module):
    """Bytes counted from the real tensors and the states of a real AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    per_dtype: dict[str, int] = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, nn.Parameter):
            key = str(t.dtype).replace('torch.', '')
            per_dtype[key] = per_dtype.get(key, 0) + t.untyped_storage().nbytes()
    grads = sum(p.grad.untyped_storage().nbytes() for p in params)
    optim = sum(v.untyped_storage().nbytes() for state in opt.state.values()
                for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return per_dtype, grads, optim


@pytest.mark.parametrize('arch', ['internvit', 'convnext'])
def test_planner_static_figures_equal_independent_count(arch):
    """DDP on one GPU here; the FSDP figures are checked against the real shards of a
    2-process run in tests/test_fsdp.py."""
    torch.manual_seed(0)
    if arch == 'internvit':  # bf16 frozen base + fp32 adapters, as the 6B configs
        model = InternViT(arch='tiny', img_size=28, dtype='bfloat16')
        saved = [r'^up\d$']
    else:
        model = ConvNeXtV2(arch='atto')
        saved = [r'^norm\d$']
    inject_adapters(model, dict(type='FLoRA', rank=4, modules_to_save=saved))
    plan = plan_model(model, dict(type='AdamW', lr=1e-3), gpus=1, strategy='ddp')
    per_dtype, grads, optim = _independent_count(model)
    assert plan.params == per_dtype
    assert plan.gradients == grads and plan.optimizer == optim
    assert plan.total == sum(per_dtype.values()) + grads + optim  # 1 GPU: no buckets
    if arch == 'internvit':
        assert set(plan.params) == {'bfloat16', 'float32'}


def test_planner_rules():
    assert optimizer_states_per_element(dict(type='AdamW')) == 2
    assert optimizer_states_per_element(dict(type='SGD', momentum=0.9)) == 1
    assert optimizer_states_per_element(dict(type='SGD')) == 0
    with pytest.raises(ValueError, match='unknown optimizer'):
        optimizer_states_per_element(dict(type='Bogus'))
    assert shard_numel((10, 3), 4) == 9 and shard_numel((3,), 8) == 1
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match='strategy'):
        plan_model(model, dict(type='AdamW'), strategy='zero3')
    ddp = plan_model(model, dict(type='AdamW'), gpus=2, strategy='ddp')
    assert ddp.buffers == ddp.gradients  # the DDP buckets


def test_estimate_memory_tool_full_internvit6b(capsys):
    """The 6B Full recipe (fp32 master weights): 20 bytes per parameter per GPU under DDP on 8
    GPUs (weights 4 + gradients 4 + AdamW 8 + DDP buckets 4), does not fit 80 GiB; under FSDP
    on 8 it does. Figures checked against the parameter count of the built model."""
    import os.path as osp
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    from mmengine.config import Config

    from flora_mm.apis.memory import build_meta_model, plan_config
    from flora_mm.cli import estimate_memory as tool
    config = osp.join(root, 'configs/ade20k/internvit6b_full_fsdp.py')
    cfg = Config.fromfile(config)
    model = build_meta_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    ddp = plan_config(cfg, gpus=8, strategy='ddp', model=model)
    assert ddp.total == 20 * n and ddp.total > 80 * 2 ** 30
    fsdp = plan_config(cfg, gpus=8, strategy='fsdp', model=model)
    assert fsdp.total < 80 * 2 ** 30
    # sharded static part: about 16 bytes per parameter / 8 (dim-0 padding adds a little)
    static = fsdp.param_bytes + fsdp.gradients + fsdp.optimizer
    assert 16 * n / 8 <= static < 1.01 * 16 * n / 8
    tool.main([config, '--gpus', '8', '--strategy', 'ddp'])
    assert 'does NOT fit 80 GiB' in capsys.readouterr().out
    tool.main([config, '--gpus', '8'])  # the config's own strategy: FSDP
    out = capsys.readouterr().out
    assert 'FSDP on 8 GPU(s)' in out and 'fits 80 GiB' in out and 'NOT' not in out


def test_unit_grad_dtype_check_names_the_unit():
    from flora_mm.engine.fsdp import check_unit_grad_dtypes, shard_units

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = InternViT(arch='tiny', img_size=28, dtype='bfloat16')
            self.head = nn.Linear(64, 2)

    model = Net()  # Full on a bf16 backbone: bf16 trainable embeddings, fp32 FPN and head
    units = shard_units(model)  # from InternViT's description
    assert units[-1] == 'backbone' and 'backbone.blocks.0' in units and 'backbone.up1' in units
    check_unit_grad_dtypes(model, units)  # described units keep each unit one dtype
    with pytest.raises(ValueError, match='backbone'):
        check_unit_grad_dtypes(model, [u for u in units if not u.startswith('backbone.up')])
    with pytest.raises(ValueError, match='<root>'):  # no units: everything in the root
        check_unit_grad_dtypes(model, [])


def test_planner_reads_the_wrapper_and_bf16_amp():
    from mmengine.config import Config

    from flora_mm.apis.memory import config_strategy, wrapper_settings
    amp = dict(type='AmpOptimWrapper', dtype='bfloat16', optimizer=dict(type='AdamW'))
    cfg = Config(dict(optim_wrapper=amp))
    assert config_strategy(cfg) == 'ddp' and wrapper_settings(cfg) == (None, torch.bfloat16)
    cfg = Config(dict(optim_wrapper=dict(amp, dtype='float16'),
                      model_wrapper_cfg=dict(type='FullyShardedModel', units=['a'])))
    assert config_strategy(cfg) == 'fsdp' and wrapper_settings(cfg) == (['a'], None)


# --------------------------------------------------------------------------- host memory
@pytest.mark.parametrize('method', ['FLoRA', 'Full'])
def test_host_sizes_equal_independent_count(tmp_path, method):
    """The host-side sizes of the tiny InternViT ADE20K config on 2 ranks against a count of
    its model, the pretrained file and torch.chunk's split, and the projected peaks against
    the schemes' rules (docs/sharding.md "Host memory")."""
    import os
    import os.path as osp

    from mmengine.config import Config

    from flora_mm.apis.host_memory import (config_host_plan, config_host_settings,
                                           config_host_sizes, host_peaks)
    from flora_mm.apis.memory import build_meta_model
    from flora_mm.datasets.checkpoints import generate_checkpoints
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    path = generate_checkpoints(str(tmp_path))['internvit_tiny']
    cfg = Config.fromfile(osp.join(root, 'configs/ade20k/tiny/internvit6b_flora_r16.py'))
    cfg.merge_from_dict({'model.backbone.backbone.init_cfg.checkpoint': str(path)})
    if method == 'Full':
        cfg.merge_from_dict({'model.backbone.peft': dict(_delete_=True, type='Full')})
    model = build_meta_model(cfg)
    sizes = config_host_sizes(cfg, 2, model=model)

    def nbytes(t):
        return t.numel() * t.element_size()
    params = list(model.parameters())
    assert sizes.weights == sum(map(nbytes, params)) + sum(map(nbytes, model.buffers()))
    assert sizes.trained == sum(nbytes(p) for p in params if p.requires_grad)
    assert sizes.optimizer == 2 * sizes.trained  # AdamW
    first = [p.reshape(p.shape[0], -1).chunk(2)[0] if p.dim() else p.reshape(1) for p in params]
    assert sizes.shard_params == sum(c.numel() * p.element_size() for c, p in zip(first, params))
    assert sizes.shard_grads == sum(c.numel() * p.element_size()
                                    for c, p in zip(first, params) if p.requires_grad)
    assert sizes.shard_optimizer == 2 * sizes.shard_grads
    assert sizes.pretrained == os.path.getsize(path)  # the file rank 0 reads
    own = model.state_dict()
    file = torch.load(path, weights_only=True)['model']
    assert sizes.pretrained_in_model == sum(nbytes(own[f'backbone.{k}']) for k in file)
    assert sizes.largest == max(map(nbytes, params + list(model.buffers())))
    # the schemes (overhead 100 bytes)
    s = sizes
    gathered = host_peaks(s, meta_init=False, save_format='full', overhead=100, device='cpu')
    assert gathered['start'] == dict(rank0=100 + s.weights + s.pretrained,
                                     other=100 + s.weights + s.pretrained)
    held = s.shard_params + s.shard_optimizer
    # rank 0: the gathered state, serialised once more in memory (mmengine's io.BytesIO)
    state = s.weights + s.optimizer
    assert gathered['save'] == dict(rank0=100 + held + state + max(state, 2 * s.trained),
                                    other=100 + held + s.largest)
    meta = host_peaks(s, meta_init=True, save_format='dcp', overhead=100, device='cpu')
    seeded = s.weights - s.pretrained_in_model
    assert meta['start'] == dict(rank0=100 + s.pretrained + seeded + s.shard_params + s.largest,
                                 other=100 + s.shard_params + s.largest)
    assert meta['save'] == dict(rank0=100 + held + s.largest + 2 * s.trained,
                                other=100 + held + s.largest)
    # on GPUs the shards are device memory: the host holds the file and what is staged
    gpu = host_peaks(s, meta_init=True, save_format='dcp', overhead=100)
    assert gpu['start'] == dict(rank0=100 + s.pretrained + seeded + s.largest,
                                other=100 + s.largest)
    assert gpu['save'] == dict(rank0=100 + s.largest + 2 * s.trained, other=100 + s.largest)
    one = host_peaks(config_host_sizes(cfg, 1, model=model), meta_init=True)
    assert one['start']['other'] is None and one['save']['other'] is None
    # the config's own settings: configs/_base_/fsdp.py's meta start, the gathered file
    cfg.merge_from_dict({'model_wrapper_cfg': dict(type='FullyShardedModel', meta_init=True)})
    assert config_host_settings(cfg) == (True, 'full')
    plan = config_host_plan(cfg, 2, model=model, overhead=100)
    assert plan['peaks'] == host_peaks(s, True, 'full', 100)
    with pytest.raises(ValueError, match='save_format'):
        host_peaks(s, True, 'zip')
    with pytest.raises(ValueError, match='device'):
        host_peaks(s, True, 'full', device='tpu')
    with pytest.raises(ValueError, match='overhead'):
        host_peaks(s, True, 'full', overhead=-1)
    cfg.merge_from_dict({'model_wrapper_cfg.save_format': 'tar'})
    with pytest.raises(ValueError, match='save_format'):
        config_host_settings(cfg)
