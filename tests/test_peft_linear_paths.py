"""The two exact forms of a linear adapter (factored, materialised) against each other and
against an independent computation, and the cost rule that picks between them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.peft import AdapterLayer, inject_adapters

CFGS = {
    'FLoRA': dict(type='FLoRA', rank=3, scale=0.7),
    'LoRA': dict(type='LoRA', rank=3, alpha=6),
}


def adapted(method, in_features=12, out_features=10, bias=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    inject_adapters(model, CFGS[method])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model[0].adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('method', list(CFGS))
def test_factored_and_materialised_paths_agree(method, bias):
    """Forward, input gradient and adapter gradients of both forms equal those of a plain
    linear layer with W0 + dW, dW written out from the method's definition."""
    results = {}
    for path in ('factored', 'materialised'):
        model = adapted(method, bias=bias)
        layer = model[0]
        layer.linear_path = path
        assert layer.uses_factored_linear() == (path == 'factored')
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
        out = model(x)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.adapter_parameters()}
        results[path] = (out.detach(), x.grad.clone(), grads)
        # independent reference: dW from the factors by the definition, then F.linear
        if method == 'FLoRA':
            u1, u2 = layer.flora_factors
            delta = 0.7 * u1 @ layer.flora_core @ u2.t()
        else:
            delta = 2.0 * layer.lora_B @ layer.lora_A
        ref = F.linear(x, layer.weight + delta, layer.bias)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_forms_agree(results, tol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)


def assert_forms_agree(results: dict, tol: float, grad_rtol: float, grad_atol: float) -> None:
    """``results[form] = (output, input gradient, {adapter tensor: gradient})`` for the
    'factored' and 'materialised' forms (also used by test_peft_conv_paths)."""
    (o1, gx1, g1), (o2, gx2, g2) = results['factored'], results['materialised']
    torch.testing.assert_close(o1, o2, rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx2, rtol=tol, atol=tol)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize('method', list(CFGS))
def test_factored_path_never_builds_the_full_matrix(method, monkeypatch):
    model = adapted(method)
    model[0].linear_path = 'factored'
    called = []
    monkeypatch.setattr(type(model[0]), 'delta_weight', lambda self: called.append(1))
    model(torch.randn(4, 12)).sum().backward()
    assert not called


def test_auto_rule_picks_factored_for_wide_layers_only():
    """in*out > 8 r (in + out): ConvNeXt-V2-tiny's MLPs from stage 1 on (192 -> 768) go
    factored, its stage-0 MLP (96 -> 384) materialised."""
    for (cin, cout), factored in [((96, 384), False), ((384, 96), False), ((768, 3072), True),
                                  ((3072, 768), True), ((192, 768), True)]:
        model = nn.Sequential(nn.Linear(cin, cout))
        inject_adapters(model, dict(type='FLoRA', rank=16))
        assert model[0].uses_factored_linear() == factored, (cin, cout)
        assert (cin * cout > 8 * 16 * (cin + cout)) == factored


def test_factored_path_with_subclassed_linear_and_3d_input():
    """A Linear subclass with its own forward keeps the form base(x) + update, through
    functional_call (no in-place), whatever the layer's size."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    base = ScaledLinear(12, 10)
    plain = copy.deepcopy(base)
    model = nn.Sequential(base)
    inject_adapters(model, CFGS['FLoRA'])
    layer: AdapterLayer = model[0]
    with torch.no_grad():
        layer.flora_core.normal_()
    assert layer.uses_factored_linear()
    x = torch.randn(3, 4, 12)
    u1, u2 = layer.flora_factors
    expected = plain(x) + x @ (0.7 * u1 @ layer.flora_core @ u2.t()).t()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
