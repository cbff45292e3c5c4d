"""The depthwise conv whose weight gradient is computed as a correlation (flora_mm.ops): same
gradients as torch's conv in float64, used exactly where it is meant to be."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.models import ConvNeXtV2
from flora_mm.ops import depthwise_conv2d, uses_correlation_weight_grad
from flora_mm.peft import inject_adapters


@pytest.mark.parametrize('shape,kernel,padding', [((2, 8, 7, 7), 7, 3), ((3, 5, 6, 9), 3, 1),
                                                  ((1, 4, 5, 5), 5, 0), ((2, 6, 4, 4), 3, 2),
                                                  ((4, 3, 20, 11), (3, 5), (1, 0))])
@pytest.mark.parametrize('channels_last', [False, True])
def test_gradients_match_torch_in_float64(shape, kernel, padding, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    padding = padding if isinstance(padding, tuple) else (padding, padding)
    weight = torch.randn(shape[1], 1, *kernel)
    bias = torch.randn(shape[1])
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = depthwise_conv2d(*inputs, padding)
    ref = F.conv2d(*ref_inputs, 1, padding, 1, shape[1])
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-4)


def test_only_where_it_is_meant():
    dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    small = torch.randn(2, 8, 7, 7)
    assert uses_correlation_weight_grad(dw, small, dw.weight)
    assert uses_correlation_weight_grad(dw, torch.randn(2, 8, 40, 40), dw.weight)  # any map
    assert not uses_correlation_weight_grad(dw, small.double(), dw.weight.double())
    assert not uses_correlation_weight_grad(dw, small, dw.weight.detach())  # frozen weight
    with torch.no_grad():
        assert not uses_correlation_weight_grad(dw, small, dw.weight)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not uses_correlation_weight_grad(dw, small, dw.weight)
    for other in (nn.Conv2d(8, 8, 3, padding=1),                     # not depthwise
                  nn.Conv2d(8, 8, 3, padding=1, groups=8, stride=2),  # strided
                  nn.Conv2d(8, 8, 3, padding=2, groups=8, dilation=2),
                  nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode='reflect'),
                  nn.Conv2d(8, 8, 3, padding='same', groups=8)):
        assert not uses_correlation_weight_grad(other, small, other.weight)


@pytest.mark.parametrize('method', [dict(type='Full'),
                                    dict(type='FLoRA', rank=4, kernel_rank=2, scale=2.0),
                                    dict(type='LoRA', rank=4)])
def test_convnext_training_uses_it_with_the_same_gradients(method, monkeypatch):
    """ConvNeXt-V2-tiny at 32 px, batch 2: every trained depthwise weight / adapter gets the
    gradients torch's own conv backward gives."""
    torch.manual_seed(0)
    model = ConvNeXtV2(arch='tiny', out_indices=(3,)).train()
    if method['type'] != 'Full':
        method = dict(method, targets=dict(types=['Conv2d']))
    inject_adapters(model, method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ('flora' in name or 'lora' in name):
                p.normal_(0.0, 0.1)
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x)[0].square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    import flora_mm.ops.depthwise_conv as dwc
    real = dwc.correlation_weight_grad
    monkeypatch.setattr(dwc, 'correlation_weight_grad',
                        lambda *a: calls.append(1) or real(*a))
    fast = grads()
    assert len(calls) == 18  # every block's depthwise conv went through it
    monkeypatch.setattr(dwc, 'uses_correlation_weight_grad', lambda *a: False)
    monkeypatch.setattr(dwc, 'correlation_weight_grad_serves', lambda *a: False)
    calls.clear()
    plain = grads()
    assert not calls
    assert fast.keys() == plain.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
