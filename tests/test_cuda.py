"""CUDA: mmcv's compiled kernels and the adapters on a GPU.

Tests marked ``cuda`` skip cleanly without a CUDA device (conftest.py says so in the summary);
``make gpu-check`` runs them on a GPU machine. The kernel-presence tests read the installed
mmcv's extension and run everywhere: on the CPU variant they assert that the check reports the
kernels missing, on the cuda variant that every one is there.
"""
import json
import shutil
import subprocess

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import flora_mm  # noqa: F401
from flora_mm.apis.cuda_ops import (DETECTION_OP_KERNELS, check_mmcv_cuda_kernels,
                                    mmcv_cuda_kernels)
from flora_mm.peft import adapter_layers, inject_adapters

from ._methods import adapter_methods, method_table


def _mmcv_built_with_cuda() -> bool:
    from mmcv.ops import get_compiling_cuda_version
    return get_compiling_cuda_version() != 'not available'


def test_kernel_check_agrees_with_mmcv_build_info():
    found = mmcv_cuda_kernels()
    assert set(found) == set(DETECTION_OP_KERNELS)
    flags = [ok for kernels in found.values() for ok in kernels.values()]
    if _mmcv_built_with_cuda():
        assert all(flags), found
        assert 'RoIAlign' in check_mmcv_cuda_kernels()
    else:
        assert not any(flags), found  # CPU build: no kernel stub may be reported
        with pytest.raises(RuntimeError, match='lacks CUDA kernels'):
            check_mmcv_cuda_kernels()


_KERNELS_CU = r"""
template <typename T>
__global__ void roi_align_forward_cuda_kernel(const T* x, T* y, int n) {
  if (threadIdx.x < n) y[threadIdx.x] = x[threadIdx.x];
}
__global__ void nms_cuda(int n, const float* boxes, unsigned long long* mask) {
  if (threadIdx.x < n) mask[0] = boxes[0] > 0;
}
// a HOST function named like a kernel: it has no device stub and must not count
void nms_rotated_cuda_kernel(int n) {}
void launch(const float* x, float* y, int n, unsigned long long* m) {
  roi_align_forward_cuda_kernel<float><<<1, 32>>>(x, y, n);
  nms_cuda<<<1, 32>>>(n, x, m);
  nms_rotated_cuda_kernel(n);
}
"""


@pytest.mark.skipif(shutil.which('nvcc') is None, reason='no nvcc on this machine')
def test_kernel_check_reads_a_real_nvcc_build(tmp_path):
    """Positive control: the symbol check on a shared object nvcc really compiled."""
    src, lib = tmp_path / 'k.cu', tmp_path / 'k.so'
    src.write_text(_KERNELS_CU)
    subprocess.run(['nvcc', '-shared', '-Xcompiler', '-fPIC', '-gencode',
                    'arch=compute_90,code=sm_90', str(src), '-o', str(lib)], check=True)
    found = mmcv_cuda_kernels(str(lib))
    assert found['RoIAlign'] == {'roi_align_forward_cuda_kernel': True,
                                 'roi_align_backward_cuda_kernel': False}
    assert found['nms'] == {'nms_cuda': True}
    assert found['nms_rotated'] == {'nms_rotated_cuda_kernel': False}
    with pytest.raises(RuntimeError, match='roi_align_backward_cuda_kernel'):
        check_mmcv_cuda_kernels(str(lib))


@pytest.mark.skipif(not _mmcv_built_with_cuda(), reason='mmcv built without CUDA (cpu variant)')
def test_cuda_variant_has_every_detection_kernel():
    missing = [f'{op}:{k}' for op, ks in mmcv_cuda_kernels().items() for k, ok in ks.items()
               if not ok]
    assert not missing


# -- adapters on CUDA -----------------------------------------------------------------------------
# every registered method that adds tensors (tests/_methods.py)
METHODS = method_table(rank=4, second=2, settings=dict(FLoRA=dict(scale=1.0)),
                       methods=adapter_methods())
LAYERS = {
    'linear': (lambda: nn.Linear(32, 48), (6, 32)),
    'conv3x3': (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 12, 12)),
    'depthwise7x7': (lambda: nn.Conv2d(16, 16, 7, padding=3, groups=16), (2, 16, 12, 12)),
}


def _plain_forward(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('layer_name', list(LAYERS))
@pytest.mark.parametrize('method', list(METHODS))
def test_adapter_equivalence_on_cuda(method, layer_name, dtype):
    torch.manual_seed(0)
    make, shape = LAYERS[layer_name]
    root = nn.Sequential(make()).cuda().to(dtype)
    inject_adapters(root, dict(METHODS[method], targets=dict(types=['Linear', 'Conv2d'])))
    (_, layer), = adapter_layers(root)
    with torch.no_grad():  # a non-zero update, so the test sees it
        for _, p in layer.adapter_parameters():
            p.normal_(0.0, 0.1)
    assert all(p.dtype == torch.float32 for _, p in layer.adapter_parameters())
    x = torch.randn(shape, device='cuda', dtype=dtype)
    out = root(x)
    # independent: the plain op with W0 + dW summed in fp32
    weight = (layer.weight.float() + layer.delta_weight().float()).to(dtype)
    ref = _plain_forward(layer.base_layer, x, weight)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref, **tol)
    out.float().square().mean().backward()
    grads = [p.grad for _, p in layer.adapter_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert layer.weight.grad is None  # the base stays frozen


# -- mmcv ops: CUDA kernels against the CPU ones ----------------------------------------------------
def _boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 50
    wh = torch.rand(n, 2, generator=gen) * 20 + 2
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.cuda
def test_mmcv_ops_cuda_match_cpu():
    from mmcv.ops import RoIAlign, RoIAlignRotated, box_iou_rotated, nms, nms_rotated
    gen = torch.Generator().manual_seed(0)
    boxes, scores = _boxes(64, gen), torch.rand(64, generator=gen)
    _, keep_cpu = nms(boxes, scores, 0.5)
    _, keep_gpu = nms(boxes.cuda(), scores.cuda(), 0.5)
    assert torch.equal(keep_cpu, keep_gpu.cpu())

    feats = torch.randn(2, 8, 32, 32, generator=gen)
    rois = torch.cat([torch.randint(0, 2, (16, 1), generator=gen).float(),
                      _boxes(16, gen) / 2], 1)
    align = RoIAlign((7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(align(feats.cuda(), rois.cuda()).cpu(), align(feats, rois),
                               atol=1e-4, rtol=1e-4)

    rboxes = torch.cat([_boxes(32, gen)[:, :2] / 2 + 5, torch.rand(32, 2, generator=gen) * 10 + 2,
                        torch.rand(32, 1, generator=gen) - 0.5], 1)
    torch.testing.assert_close(box_iou_rotated(rboxes.cuda(), rboxes.cuda()).cpu(),
                               box_iou_rotated(rboxes, rboxes), atol=1e-4, rtol=1e-4)
    rscores = torch.rand(32, generator=gen)
    _, keep_cpu = nms_rotated(rboxes, rscores, 0.3)
    _, keep_gpu = nms_rotated(rboxes.cuda(), rscores.cuda(), 0.3)
    assert torch.equal(keep_cpu.sort().values, keep_gpu.cpu().sort().values)

    rrois = torch.cat([torch.zeros(8, 1), rboxes[:8]], 1)
    ralign = RoIAlignRotated((7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=True,
                             clockwise=False)
    torch.testing.assert_close(ralign(feats.cuda(), rrois.cuda()).cpu(), ralign(feats, rrois),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU answer')
def test_gpu_check_fails_without_a_gpu(tmp_path, capsys):
    from flora_mm.harness.gpu_check import run_gpu_check
    assert run_gpu_check(str(tmp_path / 'gpu')) == 2  # non-zero: nothing was checked
    assert 'no CUDA device' in capsys.readouterr().out


def test_gpu_check_report_holds_the_steps_and_the_benchmark_table(tmp_path):
    """gpu_check.md, from a real (tiny, CPU) benchmark result: the steps with their status and
    the Table 4 rows as tools/benchmark.py prints them, ready for docs/performance.md."""
    from dataclasses import asdict

    from flora_mm.harness.benchmark import BenchConfig, format_table, run_benchmark
    from flora_mm.harness.gpu_check import (BENCH_METHODS, StepResult, _flora_summary,
                                            _report)
    cfg = BenchConfig(arch='atto', batch=1, size=32, rounds=1, warmup=0, methods=BENCH_METHODS,
                      device='cpu', memory=False, inference=False)
    result = run_benchmark(cfg)
    (tmp_path / 'bench_tiny.json').write_text(json.dumps(asdict(result)))
    flora = next(r for r in result.rows if r['method'] == 'FLoRA')
    steps = [StepResult('mmcv CUDA kernels', True, 1.5, 'all 7 | found'),
             StepResult('coco Mask R-CNN (AMP fp16)', False, 12.25, 'train exit 1: boom'),
             StepResult('torchrun train, 2 GPUs', True, 0.0, 'skipped: 1 GPU', skipped=True),
             StepResult('benchmark ConvNeXt-V2-tiny fp32', True, 3.0, _flora_summary(flora))]
    (tmp_path / 'bench_large.json').write_text('{"stale": "an earlier run"}')
    _report(str(tmp_path / 'gpu_check.md'), ['- machine: test'], steps, str(tmp_path),
            ['bench_tiny'])
    text = (tmp_path / 'gpu_check.md').read_text()
    assert not (tmp_path / 'gpu_check.md.part').exists()
    assert '| mmcv CUDA kernels | PASS | 1.5 | all 7 / found |' in text  # a | kept out of cells
    assert '| coco Mask R-CNN (AMP fp16) | FAIL | 12.2 | train exit 1: boom |' in text
    assert '| torchrun train, 2 GPUs | SKIP |' in text
    assert format_table(result) in text and '![bench_tiny](bench_tiny.png)' in text
    assert '## Benchmark (bench_tiny.json)' in text
    assert 'bench_large' not in text  # not this run's: an earlier run's file is not reported
    assert f'x{flora["x_Floor"]:.2f} Floor' in text and f'{flora["s_step"] * 1e3:.1f} ms' in text
    for method in BENCH_METHODS:
        assert any(line.startswith(f'| {method}') or line.startswith('| Floor (')
                   for line in text.splitlines()), method
