"""The fused linear + factored update (flora_mm.ops.factored_linear): gradients against
torch's numerical ones in float64, the same values as the composed form, and used by the
adapters exactly where it is meant to be."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.ops import factored_linear
from flora_mm.peft import inject_adapters


def _inputs(bias: bool, core: bool = True, dtype=torch.float64, rows=7, n_in=5, n_out=6,
            r_in=3, r_out=2):
    """x, weight, bias, down, core, up (core None: the identity, r_out = r_in)."""
    g = torch.Generator().manual_seed(0)
    r_out = r_out if core else r_in
    return [torch.randn(*s, generator=g, dtype=dtype) if s else None
            for s in ((rows, n_in), (n_out, n_in), (n_out,) if bias else None, (n_in, r_in),
                      (r_in, r_out) if core else None, (r_out, n_out))]


@pytest.mark.parametrize('core', [True, False])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('trainable', ['all', 'adapters', 'adapters+input'])
def test_gradients_match_numerical(bias, trainable, core):
    x, w, b, down, c, up = _inputs(bias, core)
    wanted = dict(all=(x, w, b, down, c, up), adapters=(down, c, up),
                  **{'adapters+input': (x, down, c, up)})[trainable]
    for t in wanted:
        if t is not None:
            t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: factored_linear(*a, scale=0.7),
                                    (x, w, b, down, up, c))


@pytest.mark.parametrize('core', [True, False])
def test_same_values_and_gradients_as_composed_form(core):
    tensors = [t.float().requires_grad_(True) if t is not None else None
               for t in _inputs(True, core, rows=50)]
    x, w, b, down, c, up = tensors
    ref = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = factored_linear(x, w, b, down, up, c, scale=1.7)
    chain = ref[0] @ ref[3] @ ref[4] if core else ref[0] @ ref[3]
    want = F.linear(ref[0], ref[1], ref[2]) + 1.7 * chain @ ref[5]
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for got, exp in zip(tensors, ref):
        if got is not None:
            torch.testing.assert_close(got.grad, exp.grad)


@pytest.mark.parametrize('method', [dict(type='FLoRA', rank=4, scale=2.0),
                                    dict(type='LoRA', rank=4)])
def test_backward_keeps_no_product_of_the_factors(method):
    """What the fused op keeps for backward beyond the layer's input and its parameters is
    the rows x r product x @ down only: no factor with the scale or the core folded in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    inject_adapters(model, dict(method, targets=dict(types=['Linear'])))
    layer = model[0]
    layer.linear_path = 'factored'
    x = torch.randn(10, 32, requires_grad=True)
    kept, out = saved_shapes(lambda: layer(x), (x, *layer.parameters()))
    assert kept == [(10, 4)]
    out.sum().backward()


def saved_tensors(run) -> tuple[list[torch.Tensor], object]:
    """Every tensor autograd keeps for backward while ``run()`` runs, and what ``run()``
    returned (also used by tests/test_recomputed_weight.py and tests/test_cast_product.py)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return kept, out


def saved_shapes(run, known) -> tuple[list, object]:
    """The shapes of what autograd keeps for backward while ``run()`` runs, other than the
    storages of the ``known`` tensors; and what ``run()`` returned."""
    ptrs = {t.untyped_storage().data_ptr() for t in known}
    kept, out = saved_tensors(run)
    return [tuple(t.shape) for t in kept if t.untyped_storage().data_ptr() not in ptrs], out


def backward_names(t: torch.Tensor) -> set[str]:
    """The names of every node of ``t``'s backward graph."""
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
    assert '_FactoredLinearBackward' in backward_names(fused)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert '_FactoredLinearBackward' not in backward_names(layer(x))
    layer.linear_path = 'materialised'
    torch.testing.assert_close(fused, layer(x), rtol=1e-5, atol=1e-5)

    with_dropout = nn.Sequential(nn.Linear(32, 48))
    inject_adapters(with_dropout, dict(method, dropout=0.1, targets=dict(types=['Linear'])))
    assert '_FactoredLinearBackward' not in backward_names(with_dropout.train()(x))
