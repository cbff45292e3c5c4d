"""The two exact forms of a conv adapter (factored: pointwise-kernel-pointwise convs beside the
frozen conv; materialised: one conv with W0 + dW) against each other and against an
independent computation, and the cost rule that picks between them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.peft import inject_adapters
from flora_mm.peft.flora import tucker_product
from tests.test_peft_linear_paths import assert_forms_agree

CFGS = {
    'FLoRA': dict(type='FLoRA', rank=3, kernel_rank=2, scale=0.7),
    'LoRA': dict(type='LoRA', rank=3, alpha=6),
}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYERS = {  # (layer, input shape)
    'conv2d_s2': (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 9, 9)),
    'conv2d_dil': (lambda: nn.Conv2d(6, 10, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2),
                   (2, 6, 11, 8)),
    'conv2d_2x2': (lambda: nn.Conv2d(8, 12, 2, stride=2, bias=False), (3, 8, 6, 6)),
    'conv1d': (lambda: nn.Conv1d(6, 10, 3, padding=1), (2, 6, 7)),
    'conv3d': (lambda: nn.Conv3d(4, 5, 3, padding=1, stride=2, bias=False), (1, 4, 5, 6, 7)),
    'unbatched': (lambda: nn.Conv2d(6, 10, 3, padding=1), (6, 5, 5)),
}


def adapted(method, layer_name, seed=0):
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    model = nn.Sequential(make())
    inject_adapters(model, dict(CFGS[method], targets=dict(types=['Conv1d', 'Conv2d', 'Conv3d'])))
    model.double()  # float64 throughout, adapters included: the forms must agree to rounding
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model[0].adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    return model, x


def reference_delta(layer, method):
    """dW written out from the method's definition."""
    if method == 'FLoRA':
        return 0.7 * tucker_product(layer.flora_core, list(layer.flora_factors))
    return 2.0 * (layer.lora_B @ layer.lora_A).view(layer.weight.shape)


@pytest.mark.parametrize('layer_name', list(LAYERS))
@pytest.mark.parametrize('method', list(CFGS))
def test_factored_and_materialised_paths_agree(method, layer_name):
    """Forward, input gradient and adapter gradients of both forms equal those of the plain
    conv with W0 + dW."""
    results = {}
    for path in ('factored', 'materialised'):
        model, x = adapted(method, layer_name)
        layer = model[0]
        layer.conv_path = path
        assert layer.uses_factored_conv(x) == (path == 'factored')
        out = model(x)
        out.pow(2).sum().backward()
        results[path] = (out.detach(), x.grad.clone(),
                         {n: p.grad.clone() for n, p in layer.adapter_parameters()})
        base = layer.base_layer
        ref = CONV[layer.weight.dim() - 2](
            x, layer.weight + reference_delta(layer, method), layer.bias, base.stride,
            base.padding, base.dilation)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_forms_agree(results, tol=1e-10, grad_rtol=1e-10, grad_atol=1e-9)


@pytest.mark.parametrize('method', list(CFGS))
def test_factored_path_never_builds_the_full_weight(method, monkeypatch):
    model, x = adapted(method, 'conv2d_s2')
    model[0].conv_path = 'factored'
    called = []
    monkeypatch.setattr(type(model[0]), 'delta_weight', lambda self: called.append(1))
    monkeypatch.setattr(type(model[0]), 'adapted_weight', lambda self: called.append(1))
    model(x).sum().backward()
    assert not called


def test_dropout_acts_on_the_update_only_in_both_forms():
    results = {}
    for path in ('factored', 'materialised'):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1))
        inject_adapters(model, dict(CFGS['LoRA'], dropout=0.5,
                                    targets=dict(types=['Conv2d'])))
        with torch.no_grad():
            model[0].lora_B.normal_()
        model[0].conv_path = path
        x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)  # the same dropout mask for both forms
        results[path] = model.train()(x)
        torch.manual_seed(7)
        dropped = F.dropout(x, 0.5)
        want = (F.conv2d(x, model[0].weight, model[0].bias, padding=1)
                + F.conv2d(dropped, model[0].delta_weight(), padding=1))
        torch.testing.assert_close(results[path], want, rtol=1e-5, atol=1e-5)


def test_auto_rule_picks_factored_for_large_weights_on_small_maps():
    """positions_out * weight size > 8 r (x.numel() + out.numel()): ConvNeXt-V2's later
    downsampling convs go factored, its stem and first downsampling conv materialised; grouped,
    depthwise and non-zero-padded convs never (the pointwise maps would not commute)."""
    cases = [  # (conv, input shape, factored)
        (nn.Conv2d(3, 96, 4, stride=4), (8, 3, 224, 224), False),        # tiny stem
        (nn.Conv2d(96, 192, 2, stride=2), (8, 96, 56, 56), False),       # tiny stage 1
        (nn.Conv2d(192, 384, 2, stride=2), (8, 192, 28, 28), True),      # tiny stage 2
        (nn.Conv2d(384, 768, 2, stride=2), (8, 384, 14, 14), True),      # tiny stage 3
        (nn.Conv2d(768, 1536, 2, stride=2), (2, 768, 14, 14), True),     # L stage 3
        (nn.Conv2d(768, 768, 7, padding=3, groups=768), (2, 768, 7, 7), False),  # depthwise
        (nn.Conv2d(768, 1536, 2, stride=2, groups=2), (2, 768, 14, 14), False),
        (nn.Conv2d(768, 1536, 3, padding=1, padding_mode='reflect'), (2, 768, 7, 7), False),
        (nn.Conv2d(768, 1536, 3, padding='same'), (2, 768, 7, 7), False),
    ]
    for conv, shape, factored in cases:
        model = nn.Sequential(conv)
        inject_adapters(model, dict(type='FLoRA', rank=16, kernel_rank=2,
                                    targets=dict(types=['Conv2d'])))
        x = torch.empty(shape, device='meta')
        assert model[0].uses_factored_conv(x) == factored, (conv, shape)
        if conv.groups == 1 and conv.padding_mode == 'zeros' and conv.padding != 'same':
            out = conv(x)
            positions = out.numel() // out.shape[1]
            assert (positions * conv.weight.numel()
                    > 8 * 16 * (x.numel() + out.numel())) == factored


@pytest.mark.parametrize('method', list(CFGS))
def test_rule_computes_nothing(method, monkeypatch):
    """Deciding must not build the factors: a graph built and dropped in forward costs time,
    and its saved tensors' freed addresses confuse storage-based accounting."""
    model, x = adapted(method, 'conv2d_s2')
    monkeypatch.setattr(type(model[0]), 'conv_factors', lambda self: pytest.fail('built'))
    model[0].uses_factored_conv(x)


def test_dora_keeps_one_conv():
    model = nn.Sequential(nn.Conv2d(768, 1536, 2, stride=2))
    inject_adapters(model, dict(type='DoRA', rank=16, targets=dict(types=['Conv2d'])))
    assert not model[0].uses_factored_conv(torch.empty(2, 768, 14, 14, device='meta'))
