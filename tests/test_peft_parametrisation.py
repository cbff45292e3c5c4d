"""FLoRA's factor init and LoRA/DoRA's scaling against the reference formulas.

FLoRA: the authors' released ``FLoRALayer.init_parameters`` draws every factor of shape
(I_n, J_n) with ``kaiming_normal_(a=sqrt(3))`` (std sqrt(0.5 / J_n)) and sets G = 0. For a fixed
core G and independent Gaussian factors of std s_n, E ||G x_1 U_1 ... x_N U_N||^2 equals
||G||^2 * prod_n I_n s_n^2 (each mode product multiplies the expected squared norm by I_n s_n^2),
which the tests compare with the mean over many draws. LoRA/DoRA: peft's default
``lora_alpha=8`` with scaling alpha / r.
"""
import math

import flora_mm  # noqa: F401
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flora_mm.peft import DoRA, FLoRA, FLoRALayer, LoRA, PEFTConfigError, inject_adapters

LAYERS = {
    'linear': (lambda: nn.Linear(96, 160), [8, 8]),
    'conv3x3': (lambda: nn.Conv2d(24, 40, 3, padding=1), [6, 6, 2, 2]),
    'depthwise7x7': (lambda: nn.Conv2d(48, 48, 7, padding=3, groups=48), [8, 1, 2, 2]),
}


def _mean_sq_ratio(layer: FLoRALayer, draws: int) -> float:
    """Mean ||dW||^2 / ||G||^2 over fresh factor draws, for a random non-zero core."""
    ratios = []
    for _ in range(draws):
        layer.reset_adapter()
        with torch.no_grad():
            layer.flora_core.normal_()
            layer.scale = 1.0
            dw = layer.delta_weight()
        ratios.append((dw.norm() ** 2 / layer.flora_core.norm() ** 2).item())
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('init', ['kaiming', 'unit'])
def test_flora_delta_norm_matches_reference_expectation(kind, init):
    torch.manual_seed(0)
    make, ranks = LAYERS[kind]
    base = make()
    layer = FLoRALayer(base, ranks=ranks, init=init)
    shape = tuple(base.weight.shape)
    if init == 'kaiming':  # the authors' std sqrt(0.5 / J_n) per factor
        expected = math.prod(size * 0.5 / r for size, r in zip(shape, layer.ranks))
    else:  # std 1 / sqrt(I_n): every mode keeps the norm
        expected = 1.0
    got = _mean_sq_ratio(layer, draws=400)
    assert got == pytest.approx(expected, rel=0.12)


def test_flora_default_init_is_the_authors():
    """Same seed, same draws: the authors' init_parameters written out on our factor order."""
    base = nn.Conv2d(16, 32, 3, padding=1)
    torch.manual_seed(3)
    layer = FLoRALayer(base, rank=4, kernel_rank=2, scale=4.0)
    assert layer.init == 'kaiming'
    torch.manual_seed(3)
    ref = [torch.empty(size, r) for size, r in zip(base.weight.shape, layer.ranks)]
    for t in ref:
        nn.init.kaiming_normal_(t, a=math.sqrt(3))
    for got, want in zip(layer.flora_factors, ref):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    assert torch.count_nonzero(layer.flora_core) == 0
    # and the distribution is the documented one: std sqrt(0.5 / J_n), whatever I_n is
    big = FLoRALayer(nn.Linear(4096, 2048), rank=16)
    for factor in big.flora_factors:
        assert factor.std().item() == pytest.approx(math.sqrt(0.5 / 16), rel=0.02)


def test_flora_issue_figures_for_the_real_layer_sizes():
    """The expected ratio ||dW|| / ||G|| at s = 1 for ConvNeXt-V2-L's pwconv (1536 -> 6144,
    r 16) and InternViT-6B's fc1 (3200 -> 12800, r 16), from the closed form."""
    def ratio(shape, ranks):
        return math.sqrt(math.prod(size * 0.5 / r for size, r in zip(shape, ranks)))
    assert ratio((6144, 1536), (16, 16)) == pytest.approx(96.0)
    assert ratio((12800, 3200), (16, 16)) == pytest.approx(200.0)


def test_flora_init_std_and_bad_init():
    layer = FLoRALayer(nn.Linear(512, 1024), rank=16, init_std=0.05)
    for factor in layer.flora_factors:
        assert factor.std().item() == pytest.approx(0.05, rel=0.03)
    with pytest.raises(PEFTConfigError, match='init'):
        FLoRA(init='xavier')
    assert FLoRA().init == 'kaiming'
    assert FLoRA(init='unit').layer_cfg('x')['init'] == 'unit'


def _lora_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Conv2d(4, 6, 3, padding=1))


@pytest.mark.parametrize('rank', [2, 4, 16])
def test_lora_default_scaling_is_peft(rank):
    """peft LoraConfig(lora_alpha=8): scaling 8 / r, on the linear output and a conv's weight."""
    assert LoRA().alpha == 8 and DoRA().alpha == 8
    model = _lora_model()
    inject_adapters(model, dict(type='LoRA', rank=rank, targets=dict(types=['Linear', 'Conv2d'])))
    lin, conv = model[0], model[1]
    with torch.no_grad():
        for layer in (lin, conv):
            layer.lora_B.normal_()
    x = torch.randn(3, 12)
    a, b = lin.lora_A.detach(), lin.lora_B.detach()
    expected = F.linear(x, lin.weight, lin.bias) + (8 / rank) * (x @ a.T @ b.T)
    torch.testing.assert_close(lin(x), expected)
    w = conv.weight + (8 / rank) * (conv.lora_B @ conv.lora_A).view_as(conv.weight)
    img = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(conv(img), F.conv2d(img, w, conv.bias, padding=1))
    # alpha=None keeps the former alpha = r (scaling 1)
    other = _lora_model()
    inject_adapters(other, dict(type='LoRA', rank=rank, alpha=None))
    assert other[0].scaling == 1.0


def test_dora_default_scaling_is_peft():
    """DoRA: W' = m * V / ||V||_c with V = W0 + (8 / r) B A (peft's DoRA, lora_alpha=8)."""
    model = _lora_model()
    w0 = model[0].weight.detach().clone()
    inject_adapters(model, dict(type='DoRA', rank=4, targets=dict(types=['Linear'])))
    lin = model[0]
    with torch.no_grad():
        lin.lora_B.normal_()
        lin.dora_magnitude.mul_(1.5)
    v = w0 + 2.0 * (lin.lora_B @ lin.lora_A).detach()
    expected_w = lin.dora_magnitude.detach()[:, None] * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(2, 12)
    torch.testing.assert_close(lin(x), F.linear(x, expected_w, lin.bias))
