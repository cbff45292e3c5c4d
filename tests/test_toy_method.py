"""A seventh method, defined and registered only here, that the shared method tests pick up.

``ToyHadamard`` is a Hadamard-product low-rank adapter (LoHa-style, Hyeon-Woo et al. 2022): on
the weight flattened to out x (in/groups * kernel), ``dW = scale * (W1a W1b) * (W2a W2b)``
(element-wise product of two rank-r products), reshaped to the weight's shape, so it adapts
linear, conv and grouped/depthwise layers and merges exactly. ``W2a`` starts at zero: injection
changes no output. It declares what the harness needs the way the built-in methods do
(``budget_rank``, ``label``, ``table_order``, ``plot_style``, a closed-form update norm) and
nothing in flora_mm names it.

tests/conftest.py imports this module, so the method is registered before the shared tests
are collected: tests/_methods.py reads the registry, and test_peft_core, test_peft_property,
test_budget, test_compare (planning and labels), test_sharding_math (update norms),
test_recompute, test_peft_convnext and test_task_models run on it unchanged. The tests below
check that they did, and the few things only this method has.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from flora_mm.peft import (AdapterLayer, PEFTConfigError, PEFTMethod, adapter_layers,
                           inject_adapters, merge_adapters, unmerge_adapters)
from flora_mm.peft.base import check_positive_int
from flora_mm.peft.norms import update_sq_norm
from flora_mm.registry import PEFT_METHODS

from ._methods import (MethodSpec, add_spec, classification_losses, method_names,
                       rank_methods)

NAME = 'ToyHadamard'


class ToyHadamardLayer(AdapterLayer):
    adapter_prefixes = ('hada_',)

    def __init__(self, base: nn.Module, rank: int = 4, scale: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__(base, dropout=dropout)
        out_features = self.weight.shape[0]
        fan_in = math.prod(self.weight.shape[1:])
        self.rank, self.scale = int(rank), float(scale)
        dev = self.weight.device

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=dev, dtype=torch.float32))

        self.hada_w1_a, self.hada_w1_b = param(out_features, self.rank), param(self.rank, fan_in)
        self.hada_w2_a, self.hada_w2_b = param(out_features, self.rank), param(self.rank, fan_in)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_b):
            nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5)
        self.hada_w2_a.zero_()  # dW = 0 at injection

    def delta_weight(self) -> torch.Tensor:
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (self.scale * product).view(self.weight.shape)

    def closed_form_sq_norm(self) -> torch.Tensor:
        """(W1a W1b) * (W2a W2b) = P Q with P's row i the outer product of W1a's and W2a's
        rows i (out x r^2) and Q's column j that of W1b's and W2b's columns j (r^2 x in), so
        ||dW||^2 = scale^2 sum((P^T P) * (Q Q^T)): r^2 x r^2 matrices, no out x in one."""
        r = self.rank
        p = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, r * r)
        q = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)
        p, q = p.float(), q.float()
        return self.scale ** 2 * ((p.transpose(0, 1) @ p) * (q @ q.transpose(0, 1))).sum()


@PEFT_METHODS.register_module(name=NAME)
@dataclass
class ToyHadamard(PEFTMethod):
    """``rank`` r of both products, ``scale`` s, ``dropout`` on the update's input."""

    rank: int = 4
    scale: float = 1.0
    dropout: float = 0.0

    layer_cls: ClassVar = ToyHadamardLayer
    layer_fields: ClassVar = ('rank', 'scale', 'dropout')
    budget_rank: ClassVar = 'rank'
    table_order: ClassVar[float] = 6
    plot_style: ClassVar = ('#9467bd', 'P')

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        check_positive_int(cfg['rank'], f'{where}: rank')
        if not isinstance(cfg['scale'], (int, float)):
            raise PEFTConfigError(f'{where}: scale must be a number, got {cfg["scale"]!r}')


def _reference_weight(layer) -> torch.Tensor:
    """W0 + s (W1a W1b) o (W2a W2b), element by element from the definition."""
    w0 = layer.weight.detach().float()
    a1, b1 = layer.hada_w1_a.detach(), layer.hada_w1_b.detach()
    a2, b2 = layer.hada_w2_a.detach(), layer.hada_w2_b.detach()
    delta = torch.einsum('ir,rj,is,sj->ij', a1, b1, a2, b2)
    return w0 + layer.scale * delta.view_as(w0)


add_spec(MethodSpec(
    NAME, settings=dict(scale=0.8), reference_weight=_reference_weight,
    # two rank-r products over the flattened weight: 2 r (d_out + d_in k^2)
    layer_count=lambda d_out, d_in, k, rank, _: 2 * rank * (d_out + d_in * (k * k if k else 1)),
    random_settings=lambda rng: dict(scale=rng.choice([0.1, 1.0, 3.0]))))


# ----------------------------------------------------------------------------- its own tests
def test_the_shared_tables_include_it():
    assert NAME in method_names() and NAME in rank_methods()
    assert method_names()[:6] == ['Frozen', 'Full', 'BitFit', 'LoRA', 'DoRA', 'FLoRA']
    from flora_mm.apis import budget as B
    from flora_mm.harness import compare as C
    assert NAME in B.RANK_METHODS and B.rank_methods()[-1] == NAME
    assert C.METHOD_ORDER[-1] == NAME and NAME not in C.METHOD_LABEL


@pytest.mark.parametrize('shape', [(10, 12), (8, 6, 3, 3), (16, 1, 7, 7), (6, 4, 3)])
def test_delta_is_the_hadamard_product_and_its_norm_the_closed_form(shape):
    base = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else \
        getattr(nn, f'Conv{len(shape) - 2}d')(shape[1], shape[0], shape[2:])
    layer = ToyHadamardLayer(base, rank=3, scale=0.6)
    assert torch.equal(layer.delta_weight(), torch.zeros(shape))
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.normal_()
        delta = layer.delta_weight()
        assert torch.allclose(layer.weight + delta, _reference_weight(layer), atol=1e-5)
        expected = delta.double().pow(2).sum()
        assert float(layer.closed_form_sq_norm()) == pytest.approx(float(expected), rel=1e-5)
        assert float(update_sq_norm(layer)) == pytest.approx(float(expected), rel=1e-5)


def test_it_trains_and_merges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(1),
                          nn.Linear(8 * 6 * 6, 4))
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    inject_adapters(model, dict(type=NAME, rank=2))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {n.rsplit('.', 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        'hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'}
    losses = classification_losses(model, x, y, 10, torch.optim.Adam(params, lr=1e-2))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    assert len(list(adapter_layers(model))) == 2
