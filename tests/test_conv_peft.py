"""LoCon, LoHa and LoKr where the shared method tests do not reach: their variants (LoCon
without Tucker, LoHa's effective conv, LoKr's decompose_both / effective conv / full factors),
LyCORIS's factorization rule, inits, the Tucker chain as convolutions, norms and configs.

The shared tests (test_peft_core, test_peft_property, test_budget, ...) run the three methods
with their defaults through the MethodSpecs in tests/_methods.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.peft import (LoConLayer, LoHaLayer, LoKrLayer, PEFTConfigError, count_parameters,
                           inject_adapters, merge_adapters, unmerge_adapters)
from flora_mm.peft.lokr import factorization
from flora_mm.peft.norms import update_sq_norm

from ._methods import _lokr_count, _locon_weight, _loha_weight, _lokr_weight, lycoris_factorization

BASES = {
    'linear': lambda: nn.Linear(12, 10),
    'conv1d': lambda: nn.Conv1d(6, 8, 3, padding=1),
    'conv2d': lambda: nn.Conv2d(6, 8, 3, padding=1),
    'grouped': lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4),
    'depthwise': lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8),
    'conv3d': lambda: nn.Conv3d(4, 6, 3, padding=1),
    'pointwise': lambda: nn.Conv2d(6, 8, 1),
}
VARIANTS = [
    (LoConLayer, _locon_weight, dict(tucker=True)),
    (LoConLayer, _locon_weight, dict(tucker=False, alpha=None)),
    (LoHaLayer, _loha_weight, dict(use_effective_conv2d=False)),
    (LoHaLayer, _loha_weight, dict(use_effective_conv2d=True, alpha=3.0)),
    (LoKrLayer, _lokr_weight, dict(decompose_factor=2)),
    (LoKrLayer, _lokr_weight, dict(decompose_factor=-1, rank=1)),
    (LoKrLayer, _lokr_weight, dict(decompose_factor=2, decompose_both=True, rank=1)),
    (LoKrLayer, _lokr_weight, dict(decompose_factor=2, use_effective_conv2d=True, rank=1)),
]


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ----------------------------------------------------------------------------- factorization
@pytest.mark.parametrize('dim, factor, expected', [
    # peft's docstring examples (peft and LyCORIS agree on them)
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)),
    # LyCORIS's code (its docstring table predates it: 360 -> (18, 20), not (8, 45))
    (360, -1, (18, 20)), (250, 8, (5, 50)), (360, 16, (15, 24)), (1024, 16, (16, 64)),
    # a dividing factor above the quotient: LyCORIS orders the pair (peft would give (64, 2))
    (128, 64, (2, 64)),
    (1, 2, (1, 1)), (3, 2, (1, 3)), (192, 2, (2, 96))])
def test_factorization_is_lycoris_rule(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_factorization_matches_the_restated_rule():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            m, n = factorization(dim, factor)
            assert (m, n) == lycoris_factorization(dim, factor), (dim, factor)
            assert m * n == dim and m <= n


# ----------------------------------------------------------------------------- update forms
@pytest.mark.parametrize('kind', list(BASES))
@pytest.mark.parametrize('cls, reference, kwargs', VARIANTS,
                         ids=lambda v: getattr(v, '__name__', None) or str(v))
def test_delta_is_the_reference_formula_and_starts_at_zero(cls, reference, kwargs, kind):
    torch.manual_seed(0)
    base = BASES[kind]()
    layer = cls(base, **{'rank': 3, **kwargs})
    assert torch.equal(layer.delta_weight(), torch.zeros_like(base.weight))  # init: dW = 0
    _randomize(layer)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape
    torch.testing.assert_close(layer.weight + delta, reference(layer), rtol=1e-5, atol=1e-6)
    expected = delta.double().pow(2).sum()
    assert float(update_sq_norm(layer)) == pytest.approx(float(expected), rel=1e-5)
    norm = layer.closed_form_sq_norm()
    if cls is not LoHaLayer:  # LoHa's closed form costs (in + out) r^4: it has none
        assert float(norm) == pytest.approx(float(expected), rel=1e-5)
    model = nn.Sequential(base)
    x = torch.randn(2, *((12,) if kind == 'linear' else (base.in_channels,) + (5,) * (
        base.weight.dim() - 2)))
    model[0] = layer
    with torch.no_grad():
        out = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
        unmerge_adapters(model)


def test_locon_tucker_is_a_pointwise_kernel_pointwise_chain():
    """LyCORIS's use_tucker on a 3x3 conv: 1x1 (in -> r), 3x3 core (r -> r) with the layer's
    stride/padding/dilation, 1x1 (r -> out), times alpha / r, added to the base conv."""
    torch.manual_seed(0)
    base = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(2, 6, 11, 11)
    model = nn.Sequential(base)
    inject_adapters(model, dict(type='LoCon', rank=4, alpha=6))
    layer = model[0]
    assert [tuple(p.shape) for _, p in layer.adapter_parameters()] == [
        (4, 6), (4, 4, 3, 3), (10, 4)]
    _randomize(layer)
    down, mid, up = (layer.lora_down.detach(), layer.lora_mid.detach(),
                     layer.lora_up.detach())
    h = F.conv2d(x, down[:, :, None, None])
    h = F.conv2d(h, mid, stride=2, padding=2, dilation=2)
    expected = base(x) + 6 / 4 * F.conv2d(h, up[:, :, None, None])
    with torch.no_grad():
        for path in ('materialised', 'factored'):
            layer.conv_path = path
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_locon_depthwise_core_ranks_are_clamped_and_counts_follow():
    model = nn.Sequential(nn.Conv2d(16, 16, 7, groups=16), nn.Conv2d(16, 32, 3, groups=4),
                          nn.Linear(5, 7))
    inject_adapters(model, dict(type='LoCon', rank=6))
    assert tuple(model[0].lora_mid.shape) == (6, 1, 7, 7)  # input mode in/groups = 1
    assert tuple(model[1].lora_mid.shape) == (6, 4, 3, 3)
    assert model[0].clamped == [(1, 6, 1)]
    # r_o d_out + r_i d_in + r_o r_i k^2, and r (d_in + d_out) for the linear
    expected = (6 * 16 + 1 * 1 + 6 * 1 * 49) + (6 * 32 + 4 * 4 + 6 * 4 * 9) + 6 * (5 + 7)
    assert count_parameters(model)['trainable'] == expected


def test_inits_follow_peft_and_lycoris():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    locon = LoConLayer(conv, rank=4)
    assert locon.lora_up.abs().sum() == 0 and locon.lora_down.abs().sum() > 0
    assert locon.lora_mid.abs().sum() > 0
    loha = LoHaLayer(conv, rank=4, use_effective_conv2d=True)
    assert loha.hada_w2_b.abs().sum() == 0
    for p in (loha.hada_w1_a, loha.hada_w1_b, loha.hada_w2_a, loha.hada_t1, loha.hada_t2):
        assert p.abs().sum() > 0
    # kaiming uniform (a = sqrt(5)) on peft's shapes: bound 1 / sqrt(fan_in)
    assert float(loha.hada_w1_a.abs().max()) <= 32 ** -0.5  # (r, out): fan-in out
    assert float(loha.hada_t1.abs().max()) <= (4 * 9) ** -0.5
    lokr = LoKrLayer(conv, rank=1, decompose_factor=4, decompose_both=True)  # 1 (4 + 4) < 16
    assert lokr.lokr_w1 is None and lokr.lokr_w1_a.abs().sum() == 0
    assert lokr.lokr_w1_b.abs().sum() > 0 and lokr.lokr_w2_a.abs().sum() > 0
    lokr = LoKrLayer(conv, rank=2, decompose_factor=4)
    assert lokr.lokr_w1.abs().sum() == 0


def test_lokr_shapes_full_factors_and_scaling():
    conv = nn.Conv2d(16, 32, 3)  # out 32 -> (4, 8), in 16 -> (4, 4) with factor 4
    lokr = LoKrLayer(conv, rank=2, alpha=3.0, decompose_factor=4)
    assert lokr.kron_shape == ((4, 8), (4, 4)) and lokr.scaling == 1.5
    assert tuple(lokr.lokr_w1.shape) == (4, 4)
    assert (tuple(lokr.lokr_w2_a.shape), tuple(lokr.lokr_w2_b.shape)) == ((8, 2), (2, 36))
    # a rank whose W2 pair would be no smaller than W2 itself keeps W2 whole
    big = LoKrLayer(conv, rank=6, decompose_factor=4)  # 6 (8 + 36) = 264 < 8 * 36 = 288
    assert big.lokr_w2 is None
    full = LoKrLayer(conv, rank=7, decompose_factor=4)  # 7 (8 + 36) = 308 >= 288
    assert tuple(full.lokr_w2.shape) == (8, 4, 3, 3)
    for layer, rank in ((lokr, 2), (big, 6), (full, 7)):
        count = sum(p.numel() for _, p in layer.adapter_parameters())
        assert count == _lokr_count(32, 16, 3, rank, 4)


@pytest.mark.parametrize('cfg, match', [
    (dict(type='LoCon', tucker='yes'), 'tucker'),
    (dict(type='LoHa', use_effective_conv2d=1), 'use_effective_conv2d'),
    (dict(type='LoKr', decompose_factor=0), 'decompose_factor'),
    (dict(type='LoKr', decompose_factor=-2), 'decompose_factor'),
    (dict(type='LoKr', decompose_both=None), 'decompose_both'),
    (dict(type='LoHa', rank=0), 'rank'),
    (dict(type='LoKr', alpha=float('nan')), 'alpha'),
])
def test_bad_configs(cfg, match):
    with pytest.raises(PEFTConfigError, match=match):
        inject_adapters(nn.Sequential(nn.Conv2d(4, 4, 3)), cfg)
