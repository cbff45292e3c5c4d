"""Adapter core: every method on every layer kind, checked against independent computations."""
import copy
import math

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flora_mm.peft import (AdapterLayer, PEFTConfigError, adapter_state_dict, count_parameters,
                           inject_adapters, load_adapter_state_dict, merge_adapters,
                           remove_adapters, unmerge_adapters)

from ._methods import adapter_methods, method_cls, method_config, method_table, randomize_adapters

tl.set_backend('numpy')

# every registered method (tests/_methods.py); rank 3, FLoRA's scale 0.7, LoRA's scaling 2
METHODS = method_table(rank=3, second=2, settings=dict(FLoRA=dict(scale=0.7),
                                                       LoRA=dict(alpha=6), DoRA=dict(alpha=6)))
ADAPTER_METHODS = adapter_methods()


def make_layer(kind):
    """(layer, input) for each layer kind the core must handle."""
    g = torch.Generator().manual_seed(0)
    layers = {
        'linear': (nn.Linear(12, 10), (4, 12)),
        'linear_nobias': (nn.Linear(12, 10, bias=False), (2, 5, 12)),
        'conv1d': (nn.Conv1d(6, 8, 3, padding=1), (2, 6, 11)),
        'conv2d': (nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=2,
                             padding_mode='reflect'), (2, 6, 13, 13)),
        'conv3d': (nn.Conv3d(4, 6, 3, padding=1), (1, 4, 5, 6, 7)),
        'depthwise': (nn.Conv2d(8, 8, 7, padding=3, groups=8), (2, 8, 9, 9)),
        'grouped': (nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 7, 7)),
        'dilated': (nn.Conv2d(5, 7, 3, padding=2, dilation=2), (2, 5, 9, 9)),
    }
    layer, shape = layers[kind]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer, torch.randn(shape, generator=g)


LAYER_KINDS = ['linear', 'linear_nobias', 'conv1d', 'conv2d', 'conv3d', 'depthwise', 'grouped',
               'dilated']


def wrap(layer):
    return nn.Sequential(layer)


def plain_reference(base_layer, weight):
    """An independent plain layer with the given weight."""
    ref = copy.deepcopy(base_layer)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', LAYER_KINDS)
def test_flora_delta_matches_tensorly_tucker(kind):
    layer, _ = make_layer(kind)
    model = wrap(layer)
    inject_adapters(model, METHODS['FLoRA'])
    randomize_adapters(model)
    adapted = model[0]
    core = adapted.flora_core.detach().double().numpy()
    factors = [f.detach().double().numpy() for f in adapted.flora_factors]
    expected = 0.7 * tl.tucker_to_tensor((core, factors))
    delta = adapted.delta_weight().detach().double().numpy()
    assert delta.shape == tuple(layer.weight.shape)
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
    # spot-check with explicit mode products too
    explicit = core
    for mode, factor in enumerate(factors):
        explicit = tl.tenalg.mode_dot(explicit, factor, mode)
    np.testing.assert_allclose(delta, 0.7 * explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', LAYER_KINDS)
@pytest.mark.parametrize('method', list(METHODS))
def test_forward_equals_plain_layer_with_updated_weight(method, kind):
    layer, x = make_layer(kind)
    base = copy.deepcopy(layer)
    model = wrap(layer)
    assert torch.equal(model(x), base(x))  # not yet injected
    inject_adapters(model, METHODS[method])
    model.train()
    # injection changes no output
    torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)
    randomize_adapters(model)
    target = model[0]
    if isinstance(target, AdapterLayer):
        weight = target.weight + target.delta_weight()
        expected = plain_reference(base, weight.detach())(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x), base(x), atol=1e-3)  # the update is non-trivial
    else:
        torch.testing.assert_close(model(x), base(x))


@pytest.mark.parametrize('kind', LAYER_KINDS)
@pytest.mark.parametrize('method', list(METHODS))
def test_gradients_and_frozen_tensors(method, kind):
    layer, x = make_layer(kind)
    model = nn.Sequential(layer, nn.Flatten(1))
    inject_adapters(model, METHODS[method])
    randomize_adapters(model)
    expected_trainable = set(adapter_state_dict(model))
    if method == 'Full':
        expected_trainable = {n for n, _ in model.named_parameters()}
    elif method == 'BitFit':
        expected_trainable = {'0.bias'} if layer.bias is not None else set()
    elif method in ADAPTER_METHODS:
        prefixes = method_cls(method).layer_cls.adapter_prefixes
        assert expected_trainable and all(n.split('.')[1].startswith(prefixes)
                                          for n in expected_trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable
    if not expected_trainable:  # Frozen, or BitFit on a layer without bias
        assert not model(x).requires_grad
        return
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the optimizer is handed EVERY parameter, with weight decay: frozen ones must not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == expected_trainable
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f'{n} changed'
        else:
            assert not torch.equal(p, trained[n]), f'{n} did not train'


@pytest.mark.parametrize('kind', LAYER_KINDS)
@pytest.mark.parametrize('method', ADAPTER_METHODS)
def test_merge_unmerge_round_trip(method, kind):
    layer, x = make_layer(kind)
    w0 = layer.weight.detach().clone()
    model = wrap(layer)
    inject_adapters(model, METHODS[method])
    randomize_adapters(model)
    model.eval()
    adapted_out = model(x)
    merge_adapters(model)
    assert model[0].merged
    merged_weight = model[0].weight.detach().clone()
    torch.testing.assert_close(model(x), adapted_out, rtol=1e-4, atol=1e-5)
    merge_adapters(model)  # idempotent
    assert torch.equal(model[0].weight, merged_weight)
    # a merged layer behaves as the plain layer with that weight
    torch.testing.assert_close(model(x), plain_reference(layer, merged_weight)(x))
    unmerge_adapters(model)
    unmerge_adapters(model)  # idempotent
    torch.testing.assert_close(model[0].weight.detach(), w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), adapted_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', ['linear', 'conv2d', 'depthwise', 'conv3d'])
@pytest.mark.parametrize('method', list(METHODS))
def test_adapter_state_dict_round_trip(method, kind, tmp_path):
    layer, x = make_layer(kind)
    fresh_base = copy.deepcopy(layer)
    model = wrap(layer)
    inject_adapters(model, METHODS[method])
    randomize_adapters(model, seed=3)
    if method not in ADAPTER_METHODS:
        with torch.no_grad():  # change the tensors the method trains (BitFit, Full)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.25)
    sd = adapter_state_dict(model)
    path = tmp_path / 'adapter.safetensors'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    other = wrap(fresh_base)
    inject_adapters(other, METHODS[method])
    result = load_adapter_state_dict(other, load_file(str(path)))
    assert result == dict(missing_keys=[], unexpected_keys=[])
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    if method in ADAPTER_METHODS:
        with pytest.raises(KeyError, match='missing'):
            load_adapter_state_dict(other, {})


def test_load_into_merged_layer_keeps_weights_consistent():
    layer, x = make_layer('conv2d')
    a, b = wrap(copy.deepcopy(layer)), wrap(copy.deepcopy(layer))
    for m in (a, b):
        inject_adapters(m, METHODS['FLoRA'])
    randomize_adapters(a, seed=5)
    merge_adapters(b)
    load_adapter_state_dict(b, adapter_state_dict(a))
    assert b[0].merged
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)


# --- parameter counts against the closed forms ------------------------------------------------
def flora_conv_count(r, r3, d_in, d_out, k):
    """Paper §4.1 with r1 = r2 = r (square kernel, d_in = in/groups)."""
    return r3 ** 2 * r ** 2 + r * (d_in + d_out) + 2 * r3 * k


@pytest.mark.parametrize('conv,r,r3', [
    (nn.Conv2d(32, 48, 3), 4, 2),
    (nn.Conv2d(32, 48, 3), 8, 1),
    (nn.Conv2d(64, 64, 7, groups=64), 4, 2),   # depthwise: in mode 1 -> r2 clamped to 1
    (nn.Conv2d(32, 64, 3, groups=4), 4, 2),    # grouped: in mode 8
])
def test_flora_conv_param_count_closed_form(conv, r, r3):
    model = wrap(conv)
    inject_adapters(model, dict(type='FLoRA', rank=r, kernel_rank=r3))
    d_in = conv.in_channels // conv.groups
    k = conv.kernel_size[0]
    if d_in >= r:
        expected = flora_conv_count(r, r3, d_in, conv.out_channels, k)
    else:  # clamped input mode: r1 r2 r3^2 + r1 d_out + r2 d_in + 2 r3 k
        r2 = d_in
        expected = r * r2 * r3 ** 2 + r * conv.out_channels + r2 * d_in + 2 * r3 * k
    counts = count_parameters(model)
    assert counts['per_method']['FLoRA']['trainable'] == expected == counts['trainable']
    assert counts['total'] == sum(p.numel() for p in conv.parameters()) + expected


def test_flora_linear_and_lora_counts():
    lin = wrap(nn.Linear(40, 24))
    inject_adapters(lin, dict(type='FLoRA', rank=5))
    assert count_parameters(lin)['trainable'] == 5 * 5 + 5 * (40 + 24)
    for conv in [nn.Conv2d(32, 48, 3), nn.Conv2d(64, 64, 7, groups=64), nn.Conv1d(6, 8, 5)]:
        model = wrap(conv)
        inject_adapters(model, dict(type='LoRA', rank=4))
        k = math.prod(conv.kernel_size)
        assert count_parameters(model)['trainable'] == 4 * (
            conv.out_channels + conv.in_channels // conv.groups * k)
        dora = wrap(copy.deepcopy(conv))
        inject_adapters(dora, dict(type='DoRA', rank=4))
        assert count_parameters(dora)['trainable'] == 4 * (
            conv.out_channels + conv.in_channels // conv.groups * k) + conv.out_channels


def test_explicit_ranks_and_overrides_and_clamp():
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 1), nn.Flatten(1))
    inject_adapters(model, dict(type='FLoRA', rank=8, kernel_rank=2,
                                overrides=[dict(pattern=r'^1$', ranks=[2, 3, 1, 1])]))
    assert list(model[0].flora_core.shape) == [8, 8, 2, 2]
    assert list(model[1].flora_core.shape) == [2, 3, 1, 1]
    model = wrap(nn.Conv2d(4, 6, 3))
    inject_adapters(model, dict(type='FLoRA', rank=16, kernel_rank=5))
    assert list(model[0].flora_core.shape) == [6, 4, 3, 3]  # every mode clamped to its size
    assert model[0].clamped == [(0, 16, 6), (1, 16, 4), (2, 5, 3), (3, 5, 3)]


def test_linear_flora_never_builds_the_full_matrix(monkeypatch):
    layer, x = make_layer('linear')
    model = wrap(layer)
    inject_adapters(model, dict(type='FLoRA', rank=3))
    randomize_adapters(model)
    model[0].linear_path = 'factored'  # wide layers' form; narrow ones pick W0 + dW (cheaper)
    called = []
    monkeypatch.setattr(type(model[0]), 'delta_weight', lambda self: called.append(1))
    model.train()
    model(x).sum().backward()
    assert not called


def test_conv_runs_a_single_convolution(monkeypatch):
    layer, x = make_layer('conv2d')
    model = wrap(layer)
    inject_adapters(model, dict(type='FLoRA', rank=3))
    calls = []
    orig = F.conv2d
    monkeypatch.setattr(F, 'conv2d', lambda *a, **k: calls.append(1) or orig(*a, **k))
    model.train()
    model(x)
    assert len(calls) == 1


def test_target_selection_include_exclude_and_types():
    model = nn.Sequential()
    model.add_module('stem', nn.Conv2d(3, 8, 3))
    model.add_module('block_conv', nn.Conv2d(8, 8, 3))
    model.add_module('block_fc', nn.Linear(8, 8))
    model.add_module('head', nn.Linear(8, 2))
    names = inject_adapters(copy.deepcopy(model), dict(
        type='LoRA', rank=2, targets=dict(types=['Conv2d', 'Linear'], include=[r'^block'])))
    assert names == ['block_conv', 'block_fc']
    names = inject_adapters(copy.deepcopy(model), dict(
        type='FLoRA', targets=dict(types=['Linear'], exclude=['head'])))
    assert names == ['block_fc']


@pytest.mark.parametrize('cfg,match', [
    (dict(type='NoSuchMethod'), 'unknown PEFT method'),
    (dict(type='FLoRA', rank=0), 'rank must be an integer >= 1'),
    (dict(type='FLoRA', kernel_rank=-1), 'kernel_rank'),
    (dict(type='FLoRA', kernel_rank=1.5), 'kernel_rank'),
    (dict(type='LoRA', rank=2, targets=dict(include=['nothing_like_this'])), 'match no layer'),
    (dict(type='FLoRA', targets=dict(types=['BatchNorm2d'])), 'unsupported layer kind'),
    (dict(type='FLoRA', bogus=1), 'bogus'),
    (dict(type='FLoRA', overrides=[dict(pattern='x', alpha=3)]), 'no per-layer field'),
    (dict(type='FLoRA', ranks=[2, 2]), 'has 2 entries'),
    (dict(type='LoRA', dropout=1.5), 'dropout'),
    (dict(type='FLoRA', targets=dict(include=['('])), 'invalid regex'),
    (dict(type='FLoRA', scale=float('nan')), 'scale must be a finite number'),
    (dict(type='FLoRA', scale=float('inf')), 'scale must be a finite number'),
    (dict(type='FLoRA', scale='4'), 'scale must be a finite number'),
    (dict(type='FLoRA', init_std=float('nan')), 'init_std'),
    (dict(type='LoRA', alpha=float('inf')), 'alpha'),
    (dict(type='DoRA', alpha=-1), 'alpha'),
    (dict(type='LoRA', dropout=float('nan')), 'dropout'),
])
def test_bad_configs_fail_with_clear_errors(cfg, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(1), nn.Linear(4, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PEFTConfigError, match=match):
        inject_adapters(model, cfg)
    # nothing half-applied: no adapter layer, nothing frozen
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()


def test_injecting_twice_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_adapters(model, dict(type='FLoRA', rank=2))
    with pytest.raises(PEFTConfigError, match='already has FLoRA'):
        inject_adapters(model, dict(type='LoRA', rank=2))


def test_plain_keys_are_kept_and_remove_adapters_gives_a_vanilla_layer():
    layer, x = make_layer('conv2d')
    plain_sd = copy.deepcopy(layer.state_dict())
    model = wrap(layer)
    inject_adapters(model, dict(type='FLoRA', rank=3))
    # a plain checkpoint loads into the injected model; only adapter keys are missing
    result = model.load_state_dict({f'0.{k}': v for k, v in plain_sd.items()}, strict=False)
    assert result.unexpected_keys == []
    assert all('flora' in k for k in result.missing_keys)
    randomize_adapters(model)
    model.eval()
    out = model(x)
    remove_adapters(model)
    assert type(model[0]) is nn.Conv2d
    assert set(model.state_dict()) == {'0.weight', '0.bias'}
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def _timm_same_padding_conv():
    from timm.layers import create_conv2d
    conv = create_conv2d(4, 6, 3, stride=2, padding='same')
    assert type(conv).__name__ == 'Conv2dSame'
    return conv, torch.randn(1, 4, 9, 9)


def _mmcv_conv():
    from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
    return MMCVConv2d(4, 6, 3, padding=1), torch.randn(2, 4, 8, 8)


@pytest.mark.parametrize('make, method', [(_timm_same_padding_conv, 'FLoRA'),
                                          (_mmcv_conv, 'LoRA')], ids=['timm-same', 'mmcv'])
def test_subclass_layers_keep_their_own_forward(make, method):
    """timm's same-padding conv and mmcv's wrapper override forward: the adapter must call it,
    not F.conv2d."""
    conv, x = make()
    model = wrap(conv)
    inject_adapters(model, dict(type=method, rank=2))
    randomize_adapters(model)
    ref = plain_reference(conv, (model[0].weight + model[0].delta_weight()).detach())
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    assert model(x).shape == conv(x).shape



@pytest.mark.parametrize('method', ADAPTER_METHODS)
def test_bf16_base_with_fp32_adapters(method):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 36, 5))
    model.to(torch.bfloat16)
    inject_adapters(model, method_config(method, rank=2))
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    randomize_adapters(model)
    out = model(torch.randn(2, 4, 6, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('method', ADAPTER_METHODS)
def test_dropout_path_matches_definition(method):
    layer, x = make_layer('conv2d')
    model = wrap(layer)
    cfg = dict(METHODS[method], dropout=0.5)
    inject_adapters(model, cfg)
    randomize_adapters(model)
    model.train()
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)
    mask_input = F.dropout(x, 0.5, training=True)
    adapted = model[0]
    if method == 'DoRA':
        directional = adapted.weight + adapted.scaling * adapted.lora_matrix()
        norm = directional.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        factor = adapted.dora_magnitude.view(-1, 1, 1, 1) / norm
        expected = (plain_reference(layer, (factor * adapted.weight).detach())(x)
                    + F.conv2d(F.pad(mask_input, (1, 1, 1, 1), mode='reflect'),
                               (factor * adapted.scaling * adapted.lora_matrix()).detach(),
                               None, stride=2, dilation=2))
    else:
        expected = (plain_reference(layer, adapted.weight.detach())(x)
                    + F.conv2d(F.pad(mask_input, (1, 1, 1, 1), mode='reflect'),
                               adapted.delta_weight().detach(), None, stride=2, dilation=2))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    model.eval()  # no dropout at eval: the single-op path
    torch.testing.assert_close(model(x), plain_reference(
        layer, (adapted.weight + adapted.delta_weight()).detach())(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('method', list(METHODS))
def test_modules_to_save_train_fully_and_are_saved(method):
    model = nn.Sequential()
    model.add_module('body', nn.Conv2d(3, 4, 3))
    model.add_module('new_head', nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)))
    cfg = dict(METHODS[method], modules_to_save=[r'^new_head$'])
    names = inject_adapters(model, cfg)
    assert not any(n.startswith('new_head') for n in names)  # not adapted, trained as a whole
    saved = {f'new_head.{n}' for n, _ in model.new_head.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved <= trainable
    assert saved <= set(adapter_state_dict(model))
    with pytest.raises(PEFTConfigError, match='modules_to_save'):
        inject_adapters(nn.Sequential(nn.Linear(2, 2)), dict(type='LoRA', modules_to_save=['zz']))
