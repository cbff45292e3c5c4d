"""The benchmark measures what it says: the rows, the interleaving, the ratios, the memory."""
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flora_mm.harness.benchmark import (METHODS, BenchConfig, TrainCase, _step_peak_bytes,
                                     balanced_orders, format_table, interleaved_times, method_configs,
                                     peak_memory_mib, plot_result, run_benchmark,
                                     saved_activation_mib, step_flops, tune_glibc_malloc)
from flora_mm.models.convnextv2 import CONVNEXTV2_ARCHS
from flora_mm.peft import inject_adapters

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__file__))


@pytest.mark.parametrize('layer, shape', [(nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
                                          (nn.Conv2d(8, 8, 7, padding=3, groups=8),
                                           (2, 8, 9, 9)),
                                          (nn.Linear(12, 10), (3, 12))])
def test_reference_form_computes_flora_with_a_second_op(layer, shape, monkeypatch):
    """Same tensors, same output as FLoRA; but two ops (base + materialised dW), as in the
    authors' layers.py."""
    fast, ref = nn.Sequential(layer), nn.Sequential(__import__('copy').deepcopy(layer))
    inject_adapters(fast, method_configs()['FLoRA'])
    inject_adapters(ref, method_configs()['FLoRA-ref'])
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast[0].flora_core.normal_()
        ref[0].flora_core.copy_(fast[0].flora_core)
    x = torch.randn(shape)
    op = 'linear' if isinstance(layer, nn.Linear) else 'conv2d'
    calls = []
    orig = getattr(F, op)
    monkeypatch.setattr(F, op, lambda *a, **k: calls.append(1) or orig(*a, **k))
    out = ref(x)
    assert len(calls) == 2
    torch.testing.assert_close(out, fast(x), rtol=1e-5, atol=1e-5)
    delta = fast[0].delta_weight()
    kw = {} if op == 'linear' else dict(padding=layer.padding, groups=layer.groups)
    expected = orig(x, layer.weight, layer.bias, **kw) + orig(x, delta, None, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n', range(1, 10))
def test_orders_are_a_balanced_latin_square(n):
    rows = balanced_orders(n)
    assert len(rows) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    for position in range(n):  # every index equally often in every position
        assert Counter(row[position] for row in rows) == Counter(
            {i: len(rows) // n for i in range(n)})
    follows = Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1  # every ordered pair equally often


def test_interleaving_follows_the_orders_and_drops_the_warmup():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in 'abcd'}
    times = interleaved_times(fns, rounds=4, warmup=1, device=torch.device('cpu'))
    assert calls == list('abdc' 'bcad' 'cdba' 'dacb' 'abdc')
    assert {n: (len(t['wall']), len(t['cpu'])) for n, t in times.items()} == {
        n: (4, 4) for n in 'abcd'}
    assert all(t >= 0 for ts in times.values() for clock in ts.values() for t in clock)


def test_cpu_clock_leaves_out_time_the_process_does_not_run():
    import time
    times = interleaved_times({'sleep': lambda: time.sleep(0.2)}, rounds=1, warmup=0,
                              device=torch.device('cpu'))
    assert times['sleep']['wall'][0] >= 0.2 > 10 * times['sleep']['cpu'][0]


def test_floor_sends_gradients_to_the_input_only():
    cfg = BenchConfig(arch='atto', batch=2, size=32, memory=False, inference=False)
    floor, frozen = TrainCase('Floor', cfg), TrainCase('Frozen', cfg)
    for case in (floor, frozen):
        case.step()
        assert all(p.grad is None for p in case.backbone.parameters())
        assert all(p.grad is not None for p in case.head.parameters())
    assert floor.x.grad is not None and floor.x.grad.abs().sum() > 0
    assert frozen.x.grad is None


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match='unknown method'):
        BenchConfig(methods=('LoRA', 'QLoRA'))
    with pytest.raises(ValueError, match='arch'):
        BenchConfig(arch='gigantic')
    with pytest.raises(ValueError, match='rounds'):
        BenchConfig(rounds=0)
    with pytest.raises(ValueError, match='clock'):
        BenchConfig(clock='sundial')


def test_malloc_tuning_applies_on_glibc():
    import platform
    assert tune_glibc_malloc() == (platform.libc_ver()[0] == 'glibc')


@pytest.mark.skipif(__import__('platform').libc_ver()[0] != 'glibc', reason='glibc malloc only')
def test_malloc_values_must_fit_mallopts_int(monkeypatch):
    """mallopt takes a C int and ctypes wraps a larger value silently: a 4 GiB trim threshold
    once became 0 (trim everything), the opposite of the setting. Such a value now fails."""
    import flora_mm.harness.benchmark as bench
    monkeypatch.setattr(bench, 'TRIM_THRESHOLD', 4 * 2 ** 30)
    with pytest.raises(ValueError, match='does not fit a C int'):
        bench.tune_glibc_malloc()
    assert 'mmap_max=0' in bench.GLIBC_TUNABLES


def test_small_run_rows_ratios_and_outputs(tmp_path):
    methods = ('Floor', 'LoRA', 'FLoRA', 'Full')
    cfg = BenchConfig(arch='atto', batch=2, size=32, rounds=2, warmup=1, methods=methods,
                      memory=False, clock='cpu')
    result = run_benchmark(cfg)
    rows = {r['method']: r for r in result.rows}
    assert list(rows) == list(methods)
    for name, row in rows.items():
        assert len(row['times']['wall']) == 2
        assert len(row['times']['cpu']) == 2
        for ref in ('Floor', 'LoRA', 'Full'):
            assert row[f'x_{ref}'] == pytest.approx(row['cpu_s_step'] / rows[ref]['cpu_s_step'])
            assert row[f'flop_x_{ref}'] == pytest.approx(row['gflop'] / rows[ref]['gflop'])
    assert rows['FLoRA']['trainable'] < rows['LoRA']['trainable'] < rows['Full']['trainable']
    # LoRA and FLoRA adapt the same layers in the same forms: FLoRA keeps what LoRA keeps and
    # the partial products of its Tucker weights (r x in k..k per layer; LoRA's B A keeps only
    # its parameters)
    assert all(row['saved_mib'] > 0 for row in rows.values())
    assert rows['LoRA']['saved_mib'] < rows['FLoRA']['saved_mib'] < 2 * rows['LoRA']['saved_mib']
    inf = result.inference
    assert inf['ratio'] == pytest.approx(inf['merged_s'] / inf['plain_s']) and inf['plain_s'] > 0
    table = format_table(result)
    assert 'Floor (frozen, input grads)' in table and 'merged' in table
    json.dumps(asdict(result))  # everything the tool writes with --json is serialisable
    if importlib.util.find_spec('matplotlib') is not None:
        plot_result(result, str(tmp_path / 'bench.png'))
        assert (tmp_path / 'bench.png').read_bytes()[:4] == b'\x89PNG'


def test_compile_run_times_each_backbone_beside_its_eager_twin(monkeypatch):
    """--compile: every compiled backbone gets an eager twin stepped in the same rounds, and the
    row carries both and their ratio. Dynamo traces for real; its 'eager' backend skips
    inductor's code generation, which takes minutes on the CI machine (tests/test_compile.py
    covers that)."""
    compiled_models = []
    real = torch.compile

    def dynamo_only(model, **kw):
        compiled_models.append(model)
        return real(model, backend='eager', **kw)

    monkeypatch.setattr(torch, 'compile', dynamo_only)
    cfg = BenchConfig(arch='atto', batch=2, size=32, rounds=2, warmup=1,
                      methods=('Floor', 'FLoRA'), memory=False, inference=False, compile=True)
    result = run_benchmark(cfg)
    assert len(compiled_models) == 2  # the twins run eager
    for row in result.rows:
        assert len(row['eager_times']['wall']) == len(row['times']['wall']) == 2
        assert row['compiled_x_eager'] == pytest.approx(row['s_step'] / row['eager_s_step'])
    assert 'compiled x eager' in format_table(result)


def test_peak_memory_counts_what_a_method_keeps():
    """Full keeps gradients and two AdamW moments of every weight: 3 x 13 MiB on atto."""
    cfg = BenchConfig(arch='atto', batch=2, size=32)
    weights = sum(p.numel() for p in TrainCase('Full', cfg).backbone.parameters()) * 4 / 2 ** 20
    floor, full = peak_memory_mib('Floor', cfg), peak_memory_mib('Full', cfg)
    for kind in ('allocated', 'rss'):
        assert floor[kind] > weights  # the weights are built after the reset
        assert full[kind] - floor[kind] > 2 * weights
    # the resident set carries the allocator's overheads on top of what torch holds
    assert floor['rss'] > floor['allocated'] * 0.9


def test_step_peak_is_the_running_maximum_of_allocations():
    """1 MiB, then 2 MiB more, free the first, then 0.5 MiB: the peak is exactly 3 MiB."""
    class Steps:
        def step(self):
            a = torch.empty(2 ** 18)
            b = torch.empty(2 ** 19)
            del a
            c = torch.empty(2 ** 17)
            del b, c

    assert _step_peak_bytes(Steps()) == 3 * 2 ** 20


def test_tool_rejects_bad_arguments_before_measuring(tmp_path):
    run = [sys.executable, 'tools/benchmark.py', '--arch', 'atto', '--size', '32']
    res = subprocess.run(run + ['--methods', 'Nope'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and 'invalid choice' in res.stderr
    res = subprocess.run(run + ['--json', str(tmp_path / 'missing' / 'x.json')], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and 'does not exist' in res.stderr
    res = subprocess.run(run + ['--batch', '0'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and 'argument --batch: must be an integer >= 1' in res.stderr
    assert set(METHODS) >= {'Floor', 'FLoRA-ref', 'Full'}


def test_every_builtin_method_has_a_row():
    """Each method flora_mm registers is measured beside the others (LoCon, LoHa and LoKr
    included), each row built as the method it names."""
    from flora_mm.registry import PEFT_METHODS
    builtin = {cls.__name__ for cls in PEFT_METHODS.module_dict.values()
               if cls.__module__.startswith('flora_mm.')}
    assert builtin >= {'LoCon', 'LoHa', 'LoKr'} and builtin <= set(METHODS)
    configs = method_configs()
    for name in ('LoCon', 'LoHa', 'LoKr'):
        assert configs[name]['type'] == name and configs[name]['rank'] == 16


def test_rebuilt_adapter_inputs_are_exactly_what_is_no_longer_kept():
    """ConvNeXt-V2 with linear MLPs (tiny): keeping the adapters' inputs costs exactly fc1's
    input (C channels) plus fc2's (4C) at every position of every block, and Floor (no
    adapters) is unchanged by the setting."""
    batch, size = 2, 64
    depths, dims = CONVNEXTV2_ARCHS['tiny']
    expected = sum(depth * batch * (size // 4 // 2 ** stage) ** 2 * 5 * dim * 4
                   for stage, (depth, dim) in enumerate(zip(depths, dims))) / 2 ** 20
    saved = {}
    for rebuild in (True, False):
        cfg = BenchConfig(arch='tiny', batch=batch, size=size, recompute_adapter_inputs=rebuild)
        saved[rebuild] = {m: saved_activation_mib(TrainCase(m, cfg)) for m in ('Floor', 'FLoRA')}
    assert saved[True]['Floor'] == saved[False]['Floor']
    assert saved[False]['FLoRA'] - saved[True]['FLoRA'] == pytest.approx(expected, abs=1e-9)


def _counted_flops(module: nn.Module, x: torch.Tensor) -> int:
    # step_flops needs only .step()
    return step_flops(SimpleNamespace(step=lambda: module(x).sum().backward()))


@pytest.mark.parametrize('groups', [1, 2, 8])
def test_flops_of_a_conv_step_count_every_gradient_at_the_forwards_cost(groups):
    """Forward, input gradient and weight gradient of a conv each cost 2 N H' W' Cout
    (Cin/groups) k k FLOPs, grouped and depthwise convs included (torch's own formula counts a
    grouped conv's weight gradient without the groups)."""
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=groups, bias=False)
    x = torch.randn(2, 8, 9, 9)
    forward = 2 * 2 * 5 * 5 * 16 * (8 // groups) * 3 * 3
    assert _counted_flops(conv, x) == 2 * forward  # frozen input: the weight gradient only
    assert _counted_flops(conv, x.requires_grad_()) == 3 * forward
    conv.requires_grad_(False)
    assert _counted_flops(conv, x) == 2 * forward  # the input gradient only


def test_flops_of_a_training_step_follow_what_each_method_computes():
    """ConvNeXt-V2-atto: Floor is the forward + input gradients (2x Frozen), Full the forward +
    input and weight gradients less the stem's input gradient (the image needs none); an adapter
    method adds to Floor's."""
    cfg = BenchConfig(arch='atto', batch=2, size=32)
    flops = {m: step_flops(TrainCase(m, cfg)) for m in ('Frozen', 'Floor', 'LoRA', 'Full')}
    stem = 2 * 2 * 8 * 8 * CONVNEXTV2_ARCHS['atto'][1][0] * 3 * 4 * 4  # 4x4, stride 4
    head = 2 * 2 * CONVNEXTV2_ARCHS['atto'][1][-1] * 10
    backbone = flops['Frozen'] - 2 * head  # Frozen: the head's forward and weight gradient
    assert flops['Floor'] == 2 * backbone + 3 * head  # the head's input gradient too
    assert flops['Full'] == 3 * backbone - stem + 3 * head
    assert flops['LoRA'] > flops['Floor']
