"""Adapter inputs rebuilt in backward (flora_mm.ops.recomputed_input, ConvNeXtV2's lean blocks):
bit-identical results, the inputs really freed after forward, and wrong rebuilds refused."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from flora_mm.models import ConvNeXtV2
from flora_mm.peft import inject_adapters
from flora_mm.peft.base import AdapterLayer
from flora_mm.ops.recomputed_input import RecomputeStats, run_with_recomputed_input

from ._methods import adapter_methods, method_table

TARGETS = dict(types=['Conv2d', 'Linear'])
# every registered method that adds tensors (tests/_methods.py)
METHODS = method_table(rank=4, second=2, targets=TARGETS, settings=dict(FLoRA=dict(scale=4.0)),
                       methods=adapter_methods())


def _adapted(arch: str, method: str, linear_path: str = 'auto', drop_path: float = 0.0):
    torch.manual_seed(0)
    model = ConvNeXtV2(arch=arch, out_indices=(1, 3), drop_path_rate=drop_path)
    inject_adapters(model, METHODS[method])
    with torch.no_grad():  # non-zero updates everywhere, so every gradient path is exercised
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                module.linear_path = linear_path
                for _, param in module.adapter_parameters():
                    param.normal_(0.0, 0.1)
    return model.train()


def _step(model: ConvNeXtV2, x: torch.Tensor, lean: bool, seed: int = 1):
    model.recompute_adapter_inputs = lean
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)  # drop path draws the same masks in both runs
    outs = model(x)
    g = torch.Generator().manual_seed(7)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return [o.detach() for o in outs], x.grad, grads


# atto: 1x1-conv MLP with channels-first GRN (no linear layers, so one linear path);
# tiny: linear MLP, channels-last GRN, both linear forms
@pytest.mark.parametrize('arch,size,linear_path', [('atto', 64, 'auto'), ('tiny', 32, 'factored'),
                                                   ('tiny', 32, 'materialised')])
@pytest.mark.parametrize('method', list(METHODS))
def test_lean_blocks_are_bit_identical(arch, size, linear_path, method):
    model = _adapted(arch, method, linear_path, drop_path=0.2)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    plain = _step(model, x, lean=False)
    model.recompute_stats = stats = RecomputeStats()
    lean = _step(model, x, lean=True)
    blocks = sum(len(s.blocks) for s in model.stages)
    # fc1's and fc2's input per block, each saved once or, by a factored 1x1-conv adapter,
    # twice (by the frozen conv and the update's pointwise conv): every saved view is rebuilt
    assert stats.replaced == stats.recomputed >= 2 * blocks
    for a, b in zip(plain[0], lean[0]):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], lean[1])
    assert plain[2].keys() == lean[2].keys() and len(plain[2]) > 0
    for name in plain[2]:
        assert torch.equal(plain[2][name], lean[2][name]), name


@pytest.mark.parametrize('lean', [False, True])
def test_adapter_inputs_are_freed_after_forward(lean):
    """The LayerNorm and GRN outputs (fc1's and fc2's inputs) die with the forward pass in the
    lean blocks; in timm's forward the adapters' autograd nodes keep them until backward."""
    model = _adapted('tiny', 'FLoRA')
    model.recompute_adapter_inputs = lean
    refs = []
    for name, module in model.named_modules():
        if name.endswith(('mlp.fc1', 'mlp.fc2')):
            module.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    outs = model(torch.randn(2, 3, 32, 32, requires_grad=True))
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert len(refs) == 2 * 18
    assert alive == (0 if lean else len(refs))
    sum(o.sum() for o in outs).backward()  # and backward still runs


def test_lean_path_only_where_it_applies():
    """eval, no-grad and frozen (no-adapter) blocks keep no recipes; nothing is recorded."""
    model = _adapted('atto', 'FLoRA')
    model.recompute_stats = stats = RecomputeStats()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert stats.replaced == 0
    frozen = ConvNeXtV2(arch='atto').train()
    frozen.recompute_stats = stats = RecomputeStats()
    frozen(torch.randn(1, 3, 64, 64, requires_grad=True))
    assert stats.replaced == 0 and stats.kept == 0


def test_helper_matches_plain_autograd_and_counts():
    torch.manual_seed(0)
    src = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    stats = RecomputeStats()

    def producer():
        return torch.tanh(src) * 2

    y = run_with_recomputed_input(lambda z: F.linear(z, w), producer(), producer, (src,), stats)
    y.square().sum().backward()
    ref_src, ref_w = src.grad.clone(), w.grad.clone()
    src.grad = w.grad = None
    F.linear(producer(), w).square().sum().backward()
    assert torch.equal(src.grad, ref_src) and torch.equal(w.grad, ref_w)
    assert stats.replaced == 1 and stats.recomputed == 1
    assert stats.replaced_bytes == 6 * 5 * 4


def test_helper_keeps_views_geometry():
    """A saved view of the input (reshape / slice) is rebuilt with the same geometry."""
    base = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)

    def producer():
        return base * 3

    def fn(z):
        return z[:, 1:4] @ w

    run_with_recomputed_input(fn, producer(), producer, (base,)).sum().backward()
    got = w.grad.clone()
    w.grad = None
    fn(producer()).sum().backward()
    assert torch.equal(got, w.grad)


def test_helper_refuses_a_source_changed_in_place():
    src = torch.randn(4, 5)
    w = torch.randn(3, 5, requires_grad=True)
    y = run_with_recomputed_input(lambda z: F.linear(z, w), src * 2, lambda: src * 2, (src,))
    src.add_(1.0)  # the rebuild would now differ from what forward used
    with pytest.raises(RuntimeError, match='modified in place'):
        y.sum().backward()


def test_helper_rebuilds_under_the_forward_autocast_state():
    """The rebuild runs under forward's autocast: a CPU bf16 region gives bf16 again."""
    src = torch.randn(8, 16)
    lin = torch.nn.Linear(16, 4)
    stats = RecomputeStats()

    def producer():
        return torch.relu(src @ torch.eye(16))  # matmul: bf16 under autocast

    with torch.autocast('cpu', dtype=torch.bfloat16):
        z = producer()
        assert z.dtype == torch.bfloat16
        y = run_with_recomputed_input(lin, z, producer, (src,), stats)
    y.float().sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = lin(producer())
    y.float().sum().backward()
    assert stats.recomputed == 1
    assert torch.equal(got, lin.weight.grad)


@pytest.mark.parametrize('path', ['auto', 'factored'])
@pytest.mark.parametrize('method', ['FLoRA', 'LoRA'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_internvit_lean_blocks_are_bit_identical(method, dtype, path):
    """qkv, fc1 (norm outputs) and fc2 (GELU output) rebuilt in backward: same numbers. Also
    in the factored form on a bf16 backbone with fp32 adapters, whose input cast must not be
    what backward keeps (InternViT-6B's layout)."""
    from flora_mm.models import InternViT
    torch.manual_seed(0)
    model = InternViT('tiny', img_size=28, with_fpn=False, drop_path_rate=0.1, dtype=dtype)
    inject_adapters(model, dict(METHODS[method], targets=dict(types=['Linear'])))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                module.linear_path = path
                for _, param in module.adapter_parameters():
                    param.normal_(0.0, 0.1)
    model.train()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    plain = _step(model, x, lean=False)
    model.recompute_stats = stats = RecomputeStats()
    lean = _step(model, x, lean=True)
    assert stats.replaced == stats.recomputed == 3 * len(model.blocks)
    for a, b in zip(plain[0], lean[0]):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], lean[1])
    for name in plain[2]:
        assert torch.equal(plain[2][name], lean[2][name]), name


@pytest.mark.parametrize('arch,size', [('atto', 64), ('tiny', 32)])
def test_block_forward_is_timms_block(arch, size):
    """The one-pass GRN is timm's GRN up to rounding, in values and in gradients."""
    from timm.models.convnext import ConvNeXtBlock

    from flora_mm.models.convnextv2 import _block_forward
    torch.manual_seed(0)
    model = ConvNeXtV2(arch=arch)
    block = model.stages[1].blocks[0]
    with torch.no_grad():  # timm initialises GRN to zero, which would hide it
        block.mlp.grn.weight.normal_(0.0, 0.5)
        block.mlp.grn.bias.normal_(0.0, 0.5)
    x = torch.randn(2, block.conv_dw.in_channels, size // 8, size // 8, requires_grad=True)
    assert type(block).forward is not ConvNeXtBlock.forward  # the block runs ours
    ours = block(x)
    (gx_ours,) = torch.autograd.grad(ours.square().sum(), x)
    torch.testing.assert_close(_block_forward(block, x), ours, rtol=0, atol=0)
    theirs = ConvNeXtBlock.forward(block, x)  # timm's own
    (gx_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours, x)  # the block did something


def test_hooks_on_a_block_run_and_the_block_stays_lean():
    """The lean path is the block's own forward: a block with hooks runs them, and its adapted
    layers still keep no copy of their inputs."""
    model = _adapted('atto', 'FLoRA')
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.conv_path = 'materialised'  # one saved view of each input (see above)
    calls = []
    block = model.stages[1].blocks[0]
    block.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs),
                                    with_kwargs=True)
    block.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    model.recompute_stats = stats = RecomputeStats()
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    assert calls == [dict(lean=True), torch.Size([1, 80, 8, 8])]
    blocks = sum(len(s.blocks) for s in model.stages)
    assert stats.replaced == stats.recomputed == 2 * blocks


def test_recompute_stats_reach_every_block():
    """Set on the backbone, the counter reaches the blocks (which count in their own forward)
    and is taken back from them."""
    from flora_mm.models import InternViT
    from flora_mm.models.lean_block import LeanBlock
    for model in (ConvNeXtV2('atto'), InternViT('tiny', img_size=28, with_fpn=False)):
        blocks = [m for m in model.modules() if isinstance(m, LeanBlock)]
        assert blocks and model.recompute_stats is None
        model.recompute_stats = stats = RecomputeStats()
        assert model.recompute_stats is stats
        assert all(b.recompute_stats is stats for b in blocks)
        model.recompute_stats = None
        assert all(b.recompute_stats is None for b in blocks)


def test_helper_refuses_a_rebuild_of_another_layout():
    """Saved views are re-cut by stride: a rebuild in another layout would be read wrongly."""
    src = torch.randn(4, 6)
    w = torch.randn(3, 4, requires_grad=True)
    y = run_with_recomputed_input(lambda z: F.linear(z, w), (src * 2).t(),
                                  lambda: (src * 2).t().contiguous(), (src,))
    with pytest.raises(RuntimeError, match='same tensor layout'):
        y.sum().backward()
