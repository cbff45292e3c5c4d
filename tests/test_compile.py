"""Adapted backbones compile (torch.compile, inductor, one graph) and match eager in fp32.

One compiled model carries both methods (FLoRA in the stem and stage 0, LoRA in stage 1), so
the test pays inductor's compile time once. The model is atto cut to two stages of one block:
inductor writes and compiles C++ kernels per distinct shape, and a cold compile of the whole of
atto took ~80 s here, against ~20 s for this.
"""
import copy

import torch

from flora_mm.models import ConvNeXtV2
from flora_mm.peft import adapter_layers, inject_adapters

TARGETS = dict(types=['Conv2d', 'Linear'])
CFGS = {
    'FLoRA': dict(type='FLoRA', rank=4, kernel_rank=2, scale=1.0, targets=TARGETS),
    'LoRA': dict(type='LoRA', rank=4, targets=TARGETS),
}


def test_compiled_flora_and_lora_convnext_match_eager():
    torch.manual_seed(0)
    model = ConvNeXtV2(arch='atto', out_indices=(0, 1))
    del model.stages[2:]
    for stage in model.stages:
        del stage.blocks[1:]
    inject_adapters(model.stem, CFGS['FLoRA'])
    for stage, method in enumerate(['FLoRA', 'LoRA']):
        inject_adapters(model.stages[stage], CFGS[method])
    layers = {n: layer for n, layer in adapter_layers(model)}
    assert {type(m).__name__ for m in layers.values()} == {'FLoRALayer', 'LoRALayer'}
    # both exact linear forms, for both methods
    for name, path in [('stages.0.blocks.0.mlp.fc1', 'materialised'),
                       ('stages.0.blocks.0.mlp.fc2', 'factored'),
                       ('stages.1.blocks.0.mlp.fc1', 'materialised'),
                       ('stages.1.blocks.0.mlp.fc2', 'factored')]:
        layers[name].linear_path = path
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
    assert grads_e.keys() == grads_c.keys()
    assert any('flora_core' in n for n in grads_e) and any('lora_A' in n for n in grads_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f'{name}: {m}')
