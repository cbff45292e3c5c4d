"""Products that cast a low-precision input inside (flora_mm.ops.cast_product): the values and
gradients of the composed ``x.to(fp32)`` form, while backward keeps the input itself."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.ops import cast_conv, cast_matmul
from flora_mm.peft import AdapterLayer, inject_adapters
from tests.test_factored_linear import saved_tensors


def kept_while(run):
    """(dtype, shape, storage) of every tensor autograd keeps for backward while ``run()``
    runs, and what it returned."""
    kept, out = saved_tensors(run)
    return [(str(t.dtype), tuple(t.shape), t.untyped_storage().data_ptr()) for t in kept], out


def assert_same_as_composed(op, composed, x, weight):
    """``op(x, weight)`` against ``composed(x.float(), weight)`` on copies: values and both
    gradients; the input's gradient in the input's dtype."""
    ref_x, ref_w = (t.detach().clone().requires_grad_(True) for t in (x, weight))
    out = op(x, weight)
    want = composed(ref_x.to(weight.dtype), ref_w)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    assert x.grad.dtype == x.dtype
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)


def test_cast_matmul_keeps_the_low_precision_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g).bfloat16().requires_grad_(True)
    down = torch.randn(12, 3, generator=g, requires_grad=True)
    kept, _ = kept_while(lambda: cast_matmul(x, down))
    assert sorted(kept) == sorted([('torch.bfloat16', (40, 12), x.untyped_storage().data_ptr()),
                                   ('torch.float32', (12, 3), down.untyped_storage().data_ptr())])
    assert_same_as_composed(cast_matmul, torch.matmul, x, down)


CONVS = {  # (input shape, weight shape, stride, padding, dilation)
    'pointwise': ((2, 6, 5, 5), (4, 6, 1, 1), 1, 0, 1),
    'strided': ((2, 6, 9, 8), (4, 6, 3, 2), (2, 1), (1, 0), 1),
    'dilated': ((1, 3, 11, 11), (5, 3, 3, 3), 1, 2, 2),
    'conv1d': ((2, 6, 9), (4, 6, 3), 2, 1, 1),
    'conv3d': ((1, 2, 5, 6, 4), (3, 2, 3, 3, 1), 1, (1, 1, 0), 1),
    'unbatched': ((6, 7, 7), (4, 6, 3, 3), 2, 1, 1),
}
CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@pytest.mark.parametrize('case', list(CONVS))
def test_cast_conv_has_the_convs_gradients(case):
    """float64 throughout (no cast): gradcheck of both inputs."""
    x_shape, w_shape, stride, padding, dilation = CONVS[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: cast_conv(a, b, stride, padding, dilation), (x, w))


@pytest.mark.parametrize('case', list(CONVS))
def test_cast_conv_keeps_the_low_precision_input(case):
    x_shape, w_shape, stride, padding, dilation = CONVS[case]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(w_shape, generator=g, requires_grad=True)
    kept, _ = kept_while(lambda: cast_conv(x, w, stride, padding, dilation))
    assert {k[0] for k in kept if k[1] == tuple(x.shape) or k[1][1:] == tuple(x.shape)} == {
        'torch.bfloat16'}
    assert all(k[2] in (x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr())
               for k in kept)
    conv = CONV_FNS[len(w_shape)]
    assert_same_as_composed(lambda a, b: cast_conv(a, b, stride, padding, dilation),
                            lambda a, b: conv(a, b, None, stride, padding, dilation), x, w)


def test_cast_conv_rejects_what_it_cannot_run():
    w = torch.randn(4, 6, 3, 3)
    with pytest.raises(ValueError, match='4-D input'):
        cast_conv(torch.randn(6, 5), w)
    with pytest.raises(ValueError, match='stride must be an int or 2 ints'):
        cast_conv(torch.randn(1, 6, 5, 5), w, stride=(1, 1, 1))
    with pytest.raises(ValueError, match='padding'):
        cast_conv(torch.randn(1, 6, 5, 5), w, padding='same')


@pytest.mark.parametrize('method', [dict(type='FLoRA', rank=3, kernel_rank=2, scale=0.7),
                                    dict(type='LoRA', rank=3, alpha=6)])
def test_factored_conv_on_a_bf16_backbone_keeps_no_fp32_copy_of_its_input(method):
    """fp32 adapters on a bf16 conv, outside autocast: the factored form keeps the bf16 input
    (its first conv casts inside), and gives what casting the input by hand gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 2, stride=2)).bfloat16()
    inject_adapters(model, dict(method, targets=dict(types=['Conv2d'])))
    layer = model[0]
    assert isinstance(layer, AdapterLayer)
    layer.conv_path = 'factored'
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            assert p.dtype == torch.float32
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 8, 6, 6).bfloat16().requires_grad_(True)
    kept, out = kept_while(lambda: layer(x))
    assert not [k for k in kept if k[0] == 'torch.float32' and k[1] == tuple(x.shape)]
    # the reference: the update's input cast by hand (the form before the cast moved inside)
    ref_x = x.detach().clone().requires_grad_(True)
    want = layer._factored_conv(ref_x, ref_x.float())
    assert [k for k in kept_while(lambda: layer._factored_conv(ref_x, ref_x.float()))[0]
            if k[0] == 'torch.float32' and k[1] == tuple(x.shape)]  # what the test guards
    torch.testing.assert_close(out, want)
    grads = {}
    for name, (inp, value) in {'cast inside': (x, out), 'by hand': (ref_x, want)}.items():
        layer.zero_grad(set_to_none=True)
        value.float().square().sum().backward()
        grads[name] = [inp.grad] + [p.grad for _, p in layer.adapter_parameters()]
    for got, ref in zip(grads['cast inside'], grads['by hand']):
        torch.testing.assert_close(got, ref)
