"""The op that rebuilds an adapted weight in backward (flora_mm.ops.recomputed_weight): the
same values and gradients as autograd's composed form, numerically checked in float64, nothing
weight-sized kept for backward, and used by the adapters exactly where it is meant to be."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.ops import linear_or_conv_with_recomputed_weight, recomputed_weight_serves
from flora_mm.peft import AdapterLayer, inject_adapters
from tests.test_factored_linear import backward_names, saved_shapes

LAYERS = {
    'linear': (lambda: nn.Linear(6, 5), (2, 3, 6)),
    'conv1d': (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    'conv2d': (lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
               (2, 4, 7, 6)),
    'conv2d grouped': (lambda: nn.Conv2d(4, 6, (2, 3), padding=(0, 1), groups=2), (2, 4, 5, 5)),
    'depthwise': (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 6, 6)),
    'conv3d': (lambda: nn.Conv3d(3, 4, 2, stride=(1, 2, 1)), (1, 3, 4, 5, 3)),
}


def _setup(name: str, dtype: torch.dtype, bias_trainable: bool):
    """A layer, an input, two trainable factors and weight_fn = W0 + a @ b (reshaped)."""
    make, shape = LAYERS[name]
    g = torch.Generator().manual_seed(0)
    layer = make().to(dtype)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(bias_trainable)
    out_dim = layer.weight.shape[0]
    a = torch.randn(out_dim, 2, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(2, layer.weight[0].numel(), generator=g, dtype=dtype, requires_grad=True)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)

    def weight_fn():
        return layer.weight + (a @ b).view(layer.weight.shape)

    return layer, x, (layer.weight, a, b), weight_fn


def _composed(layer, x, weight_fn):
    return layer._conv_forward(x, weight_fn(), layer.bias) if not isinstance(
        layer, nn.Linear) else F.linear(x, weight_fn(), layer.bias)


@pytest.mark.parametrize('bias_trainable', [True, False])
@pytest.mark.parametrize('name', list(LAYERS))
def test_gradients_match_numerical(name, bias_trainable):
    layer, x, sources, weight_fn = _setup(name, torch.float64, bias_trainable)

    def run(x, bias, a, b):
        return linear_or_conv_with_recomputed_weight(layer, x, weight_fn(), weight_fn, bias,
                                                     sources)

    assert torch.autograd.gradcheck(run, (x, layer.bias, sources[1], sources[2]))


@pytest.mark.parametrize('name', list(LAYERS))
def test_same_values_and_gradients_as_composed_form_fp32(name):
    """fp32 on the CPU: the depthwise case goes through the correlation weight gradient."""
    layer, x, sources, weight_fn = _setup(name, torch.float32, True)
    params = (x, layer.bias, *sources[1:])
    out = linear_or_conv_with_recomputed_weight(layer, x, weight_fn(), weight_fn,
                                                    layer.bias, sources)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    want_out = _composed(layer, x, weight_fn)
    want = torch.autograd.grad(want_out, params, grad)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_keeps_no_weight_and_checks_sources():
    layer, x, sources, weight_fn = _setup('conv2d', torch.float32, False)
    kept, (out, composed) = saved_shapes(lambda: (
        linear_or_conv_with_recomputed_weight(layer, x, weight_fn(), weight_fn, layer.bias,
                                              sources),
        _composed(layer, x, weight_fn)), (x, *sources))
    assert kept == [tuple(layer.weight.shape)]  # only the composed form kept W0 + dW
    out.sum().backward()  # fine: nothing changed
    out = linear_or_conv_with_recomputed_weight(layer, x, weight_fn(), weight_fn,
                                                    layer.bias, sources)
    with torch.no_grad():
        sources[1].add_(1.0)  # an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()
    del composed


def test_rejects_what_it_cannot_run():
    conv = nn.Conv2d(3, 3, 3, padding='same')
    x = torch.randn(1, 3, 5, 5)
    assert not recomputed_weight_serves(conv, x)
    assert not recomputed_weight_serves(nn.Conv2d(3, 3, 3, padding=1, padding_mode='reflect'), x)
    assert not recomputed_weight_serves(nn.Conv2d(3, 3, 3), x[0])  # unbatched
    with pytest.raises(ValueError, match='cannot run a Conv2d on a 3-D input'):
        linear_or_conv_with_recomputed_weight(nn.Conv2d(3, 3, 3), x[0], None, lambda: None,
                                              None)


@pytest.mark.parametrize('method', [dict(type='FLoRA', rank=2, kernel_rank=2, scale=2.0),
                                    dict(type='LoRA', rank=2)])
def test_adapters_use_it_in_training_only(method):
    """Materialised adapters in fp32 training rebuild their weight in backward; autocast, no
    grad and merged layers do not; the outputs and gradients are those of the composed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(2), nn.Linear(25, 7))
    inject_adapters(model, method)
    layers = [m for m in model if isinstance(m, AdapterLayer)]
    assert len(layers) == 3
    for layer in layers:
        layer.linear_path = layer.conv_path = 'materialised'
        with torch.no_grad():
            for _, p in layer.adapter_parameters():
                p.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 5, 5)
    out = model(x)
    assert '_RecomputedWeightOpBackward' in backward_names(out)
    assert all(layer.recomputes_weight(torch.randn(2, 3, 5, 5) if i == 0 else
                                       torch.randn(2, 8, 5, 5) if i == 1 else
                                       torch.randn(2, 8, 25)) for i, layer in enumerate(layers))
    grads = torch.autograd.grad(out.square().sum(), [p for l in layers
                                                     for _, p in l.adapter_parameters()])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert '_RecomputedWeightOpBackward' not in backward_names(model(x))
    with torch.no_grad():
        assert not layers[0].recomputes_weight(x)
    # a weight small next to its input (72 values, a batch of 64 x 8 x 5 x 5) is kept
    assert layers[1].weight.numel() == 72
    assert not layers[1].recomputes_weight(torch.randn(64, 8, 5, 5))
    assert layers[1].recomputes_weight(torch.randn(5, 8, 5, 5))
    for layer in layers:  # the composed form: base op with W0 + dW
        layer.recomputes_weight = lambda x: False
    ref = model(x)
    assert '_RecomputedWeightOpBackward' not in backward_names(ref)
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref.square().sum(), [p for l in layers
                                                         for _, p in l.adapter_parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
