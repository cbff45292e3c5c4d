"""Every method on timm's ConvNeXt-V2-atto: the parameter table and a short fit that lowers the loss."""

import pytest
import timm
import torch
from torch import nn

from flora_mm.peft import count_parameters, inject_adapters

from ._methods import adapter_methods, classification_losses, method_table, spec

TARGETS = dict(types=['Conv2d', 'Linear'], exclude=[r'^head'])
# every registered method (tests/_methods.py)
METHODS = method_table(rank=4, second=2, targets=TARGETS, settings=dict(FLoRA=dict(scale=1.0)))


def expected_trainable(model: nn.Module, method: str) -> int:
    """Closed forms per layer (paper §4.1 / LoRA eq. 3 / tests/_methods.py), computed from the
    plain model."""
    total = 0
    count = spec(method).layer_count
    for name, m in model.named_modules():
        if name.startswith('head') or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        shape = m.weight.shape
        if method == 'BitFit':
            total += m.bias.numel() if m.bias is not None else 0
        elif method in adapter_methods():
            assert len(set(shape[2:])) <= 1  # square kernels
            total += count(shape[0], shape[1], shape[2] if len(shape) > 2 else None, 4, 2)
    if method == 'Full':
        total = sum(p.numel() for p in model.parameters())  # injected into the whole model
    return total


def build():
    torch.manual_seed(0)
    return timm.create_model('convnextv2_atto', pretrained=False, num_classes=4)


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 4


def test_parameter_table(capsys):
    rows = []
    for method, cfg in METHODS.items():
        model = build()
        plain_total = sum(p.numel() for p in model.parameters())
        expected = expected_trainable(model, method)
        inject_adapters(model, cfg)
        counts = count_parameters(model)
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith('head'))
        assert counts['per_method'][method]['trainable'] == expected
        assert counts['total'] == plain_total + counts['per_method'][method]['added']
        rows.append((method, counts['total'], expected, head))
    with capsys.disabled():
        print('\nconvnextv2_atto  method  total  trainable(backbone)')
        for row in rows:
            print(f'  {row[0]:7s} {row[1]:9d} {row[2]:9d}')
    # FLoRA trains fewer tensors than LoRA at the same rank on this conv net
    table = {r[0]: r[2] for r in rows}
    assert table['FLoRA'] < table['LoRA'] < table['DoRA'] < table['Full']
    assert table['BitFit'] < table['FLoRA']


@pytest.mark.parametrize('method', list(METHODS))
def test_few_steps_lower_the_loss(method, batch):
    images, labels = batch
    model = build()
    inject_adapters(model, METHODS[method])
    for p in model.head.parameters():  # the task head always trains
        p.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    losses = classification_losses(model, images, labels, 8,
                                   torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0))
    assert losses[-1] < losses[0] * 0.9, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
