"""Property test: for random layer shapes and ranks, every method keeps forward == merged
forward, and merge followed by unmerge restores W0 (fp32 tolerance).

Plain seeded loops (no hypothesis): each case is reproducible from its index, printed on failure.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.peft import adapter_layers, inject_adapters, merge_adapters, unmerge_adapters

from ._methods import method_cls, method_config, method_names, randomize_adapters, spec

CASES = 60  # per method
KINDS = ('Linear', 'Conv1d', 'Conv2d', 'Conv3d')
PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def random_layer(rng: random.Random):
    """(layer, input, description) with random kind, kernel 1-7, groups (depthwise too),
    dilation, stride, padding and padding mode."""
    kind = rng.choice(KINDS)
    if kind == 'Linear':
        fin, fout = rng.randint(1, 24), rng.randint(1, 24)
        layer = nn.Linear(fin, fout, bias=rng.random() < 0.7)
        x = torch.randn(rng.randint(1, 3), rng.randint(1, 4), fin)
        return layer, x, f'Linear({fin},{fout})'
    dims = int(kind[-2])
    groups = rng.choice([1, 1, 2, 3, 'depthwise'])
    if groups == 'depthwise':
        groups = rng.randint(1, 8)
        cin, cout = groups, groups * rng.randint(1, 2)
    else:
        cin, cout = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    k = rng.randint(1, 7) if dims < 3 else rng.randint(1, 4)
    dilation = rng.randint(1, 2)
    stride = rng.randint(1, 3)
    mode = rng.choice(PADDING_MODES)
    effective = dilation * (k - 1) + 1
    size = effective + rng.randint(0, 4)
    if stride == 1 and rng.random() < 0.3:
        padding = 'same'
    else:
        padding = rng.randint(0, min(3, size - 1))  # reflect needs padding < input size
    conv = getattr(nn, kind)(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                             groups=groups, bias=rng.random() < 0.7, padding_mode=mode)
    x = torch.randn(rng.randint(1, 2), cin, *([size] * dims))
    desc = (f'{kind}({cin},{cout},k={k},s={stride},p={padding},d={dilation},g={groups},'
            f'{mode}) input {tuple(x.shape)}')
    return conv, x, desc


def random_method(name: str, rng: random.Random, kind: str) -> dict:
    """A random config: a rank in 1..8 for rank methods, then the method's own random
    settings (tests/_methods.py)."""
    rank = rng.randint(1, 8) if method_cls(name).budget_rank is not None else None
    random_settings = spec(name).random_settings
    settings = random_settings(rng) if random_settings is not None else {}
    return method_config(name, rank, targets=dict(types=[kind]), **settings)


def plain_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's op with ``weight``, computed without flora_mm."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


@pytest.mark.parametrize('method', method_names())
def test_inject_forward_merge_unmerge(method):
    for case in range(CASES):
        rng = random.Random(f'{method}-{case}')
        torch.manual_seed(case)
        layer, x, desc = random_layer(rng)
        cfg = random_method(method, rng, type(layer).__name__)
        w0 = layer.weight.detach().clone()
        holder = nn.Module()
        holder.layer = layer
        inject_adapters(holder, cfg)
        randomize_adapters(holder, torch.Generator().manual_seed(case), std=0.3)
        holder.eval()
        where = f'case {case}: {desc}, {cfg}'
        adapted = list(adapter_layers(holder))
        with torch.no_grad():
            y_adapted = holder.layer(x)
            if adapted:
                # independent reference: the plain op with W0 + the layer's update
                ref_w = spec(method).reference_weight(adapted[0][1])
                torch.testing.assert_close(y_adapted, plain_forward(layer, x, ref_w),
                                           rtol=1e-4, atol=1e-5, msg=where)
            merge_adapters(holder)
            y_merged = holder.layer(x)
            torch.testing.assert_close(y_merged, y_adapted, rtol=1e-4, atol=1e-4, msg=where)
            unmerge_adapters(holder)
            torch.testing.assert_close(holder.layer.weight, w0, rtol=1e-5, atol=1e-5, msg=where)
            torch.testing.assert_close(holder.layer(x), y_adapted, rtol=1e-4, atol=1e-4,
                                       msg=where)
        if method_cls(method).layer_cls is not None:
            assert adapted, where
            assert any(float(lay.delta_weight().detach().abs().max()) > 0
                       for _, lay in adapted), where
