"""The fused linear + factored update (flora_mm.ops.factored_linear): gradients against
torch's numerical ones in float64, the same values as the composed form, and used by the
adapters exactly where it is meant to be."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.ops import factored_linear
from flora_mm.peft import inject_adapters


def _inputs(bias: bool, dtype=torch.float64, rows=7, n_in=5, n_out=6, r=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype) if s else None
            for s in ((rows, n_in), (n_out, n_in), (n_out,) if bias else None, (n_in, r),
                      (r, n_out))]


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('trainable', ['all', 'adapters', 'adapters+input'])
def test_gradients_match_numerical(bias, trainable):
    x, w, b, down, up = _inputs(bias)
    wanted = dict(all=(x, w, b, down, up), adapters=(down, up),
                  **{'adapters+input': (x, down, up)})[trainable]
    for t in wanted:
        if t is not None:
            t.requires_grad_(True)
    assert torch.autograd.gradcheck(factored_linear, (x, w, b, down, up))


def test_same_values_and_gradients_as_composed_form():
    x, w, b, down, up = [t.float().requires_grad_(True) for t in _inputs(True, rows=50)]
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w, b, down, up)]
    out = factored_linear(x, w, b, down, up)
    want = F.linear(ref[0], ref[1], ref[2]) + ref[0] @ ref[3] @ ref[4]
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for got, exp in zip((x, w, b, down, up), ref):
        torch.testing.assert_close(got.grad, exp.grad)


def _backward_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn.name() in seen:
            continue
        seen.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize('method', [dict(type='FLoRA', rank=4, scale=2.0),
                                    dict(type='LoRA', rank=4)])
def test_adapters_use_it_where_meant(method):
    """Factored linear adapters run the fused op in fp32 training; autocast and dropout keep
    the composed form. Both give the same output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    inject_adapters(model, dict(method, targets=dict(types=['Linear'])))
    layer = model[0]
    layer.linear_path = 'factored'
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    x = torch.randn(2, 5, 32)
    fused = layer(x)
    assert '_FactoredLinearBackward' in _backward_names(fused)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert '_FactoredLinearBackward' not in _backward_names(layer(x))
    layer.linear_path = 'materialised'
    torch.testing.assert_close(fused, layer(x), rtol=1e-5, atol=1e-5)

    with_dropout = nn.Sequential(nn.Linear(32, 48))
    inject_adapters(with_dropout, dict(method, dropout=0.1, targets=dict(types=['Linear'])))
    assert '_FactoredLinearBackward' not in _backward_names(with_dropout.train()(x))
