"""Adapted backbones compile (torch.compile, inductor, one graph) and match eager in fp32."""
import copy

import pytest
import torch

from flora_mm.models import ConvNeXtV2
from flora_mm.peft import adapter_layers, inject_adapters

TARGETS = dict(types=['Conv2d', 'Linear'])
CFGS = {
    'FLoRA': dict(type='FLoRA', rank=4, kernel_rank=2, scale=1.0, targets=TARGETS),
    'LoRA': dict(type='LoRA', rank=4, targets=TARGETS),
}


@pytest.mark.parametrize('method', list(CFGS))
def test_compiled_adapted_convnext_matches_eager(method):
    torch.manual_seed(0)
    model = ConvNeXtV2(arch='atto', out_indices=(1, 3))
    inject_adapters(model, CFGS[method])
    layers = dict(adapter_layers(model))
    # both linear forms occur in atto (40..320 channels): force one of each kind to be sure
    layers['stages.3.blocks.1.mlp.fc1'].linear_path = 'factored'
    layers['stages.0.blocks.0.mlp.fc1'].linear_path = 'materialised'
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers.values():
            for _, p in layer.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # a non-zero update
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, generator=g)

    def run(fn, module):
        xi = x.clone().requires_grad_(True)
        outs = fn(xi)
        sum(o.pow(2).mean() for o in outs).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        return outs, xi.grad, grads

    outs_e, gx_e, grads_e = run(model, model)
    outs_c, gx_c, grads_c = run(compiled, compiled_model)
    for oe, oc in zip(outs_e, outs_c):
        torch.testing.assert_close(oc, oe, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 0
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f'{name}: {m}')
