"""Cost of a training step per PEFT method, against the physical limit (``tools/benchmark.py``).

Every method is built once in ONE process and timed interleaved over rounds (in the orders of
a balanced Latin square: each method in each position and after each other method alike), so
load from other processes on a shared machine falls on all of them alike; the first rounds are
a warm-up and each method's figure is its median over the rest. Ratios are taken within the
run, to:

* ``Floor``: the frozen backbone with gradients flowing to the input. That is the forward pass
  plus the input gradients, which every adapter method must pay: the physical limit;
* ``LoRA`` and ``Full``, the baselines of the paper's Table 4.

``FLoRA-ref`` is FLoRA in the form of the authors' released ``layers.py``: the base op, plus a
second conv/linear with the materialised update added to its output. Peak memory is measured
per method in its own (spawned) process as the peak of what torch has allocated: weights,
gradients, optimizer state and activations (CUDA: ``max_memory_allocated``; CPU: the same sum,
from the profiler's record of every allocation). On the CPU the peak resident set above the
process's size before the model was built is reported beside it: that one also carries the
allocator's overheads (docs/performance.md). Beside the times, each method's arithmetic (the
FLOPs of its matrix products and convolutions in one step, ``step_flops``): a step cannot
take a smaller share of another method's time than its arithmetic's share, unless its ops
run faster per FLOP than the other's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ..models import ConvNeXtV2
from ..models.convnextv2 import CONVNEXTV2_ARCHS
from ..peft import (FLoRA, FLoRALayer, PEFTMethod, count_parameters, inject_adapters,
                    merge_adapters)
from ..ops.recomputed_input import RecomputeStats

TARGETS = dict(types=['Conv2d', 'Linear'])


class FLoRAReferenceLayer(FLoRALayer):
    """FLoRA as the authors' ``layers.py`` runs it: base output + op(x, materialised dW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_op(x, self.weight, self.bias)
        delta = self._cast_like(self.delta_weight(), x)
        return self.base_op(x, self.weight, self.bias) + self.base_op(self.dropout(x), delta, None)


@dataclass
class FLoRAReference(FLoRA):
    """Not registered: a benchmark row only, with FLoRA's tensors and FLoRA's update."""

    layer_cls: ClassVar = FLoRAReferenceLayer


def method_configs() -> dict[str, dict | PEFTMethod]:
    """The rows, in table order: FLoRA rank 16 / kernel rank 2 against LoRA and DoRA rank 16,
    and the other conv methods as their r16 recipes (configs/*/convnextv2_{locon,loha,lokr}_r16.py:
    rank 16 and the libraries' defaults; LoKr's decompose_factor -1)."""
    flora = dict(rank=16, kernel_rank=2, scale=4.0, targets=TARGETS)
    return {
        'Floor': dict(type='Frozen'),  # + gradients to the input (see TrainCase)
        'Frozen': dict(type='Frozen'),
        'BitFit': dict(type='BitFit', targets=TARGETS),
        'LoRA': dict(type='LoRA', rank=16, targets=TARGETS),
        'DoRA': dict(type='DoRA', rank=16, targets=TARGETS),
        'FLoRA': dict(type='FLoRA', **flora),
        'FLoRA-ref': FLoRAReference(**flora),
        'LoCon': dict(type='LoCon', rank=16, tucker=True, targets=TARGETS),
        'LoHa': dict(type='LoHa', rank=16, targets=TARGETS),
        'LoKr': dict(type='LoKr', rank=16, decompose_factor=-1, targets=TARGETS),
        'Full': dict(type='Full'),
    }


METHODS: tuple[str, ...] = tuple(method_configs())
#: name prefix of the eager twins a --compile run times beside the compiled backbones
EAGER = 'eager '
LABELS = {'Floor': 'Floor (frozen, input grads)', 'FLoRA-ref': 'FLoRA (reference form)'}


@dataclass
class BenchConfig:
    arch: str = 'tiny'
    batch: int = 8
    size: int = 224
    rounds: int = 6
    warmup: int = 2
    methods: tuple[str, ...] = METHODS
    device: str = 'auto'
    bf16: bool = False
    compile: bool = False
    memory: bool = True
    inference: bool = True
    #: which clock the ratios use: 'wall', or 'cpu' (this process's CPU time: on a shared
    #: machine it leaves out the time other processes hold the cores)
    clock: str = 'wall'
    tune_malloc: bool = True
    #: torch's intra-op threads (None: torch's default). On an oversubscribed machine every
    #: parallel region waits for a descheduled thread, which makes small ops cost milliseconds
    threads: int | None = None
    #: ConvNeXtV2(recompute_adapter_inputs=...): False keeps the adapters' inputs (to compare)
    recompute_adapter_inputs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in CONVNEXTV2_ARCHS:
            raise ValueError(f'unknown ConvNeXt-V2 arch {self.arch!r}; choose one of '
                             f'{list(CONVNEXTV2_ARCHS)}')
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f'unknown method(s) {unknown}; choose from {list(METHODS)}')
        if not self.methods:
            raise ValueError('methods: name at least one')
        for name in ('batch', 'size', 'rounds'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.clock not in ('wall', 'cpu'):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.clock == 'cpu' and self.resolved_device().type != 'cpu':
            raise ValueError('clock cpu is for CPU runs; CUDA steps are timed on the wall clock')
        if self.threads is not None and self.threads < 1:
            raise ValueError(f'threads must be >= 1, got {self.threads}')
        if self.warmup < 0:
            raise ValueError(f'warmup must be >= 0, got {self.warmup}')
        if self.bf16 and self.resolved_device().type != 'cuda':
            raise ValueError('bf16 autocast is for CUDA; the CPU run measures fp32')
        self.methods = tuple(self.methods)

    def resolved_device(self) -> torch.device:
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        device = torch.device(self.device)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError('device cuda asked for, but torch sees no CUDA device')
        return device


# -- the allocator --------------------------------------------------------------------------
# glibc's malloc serves blocks above a threshold with mmap and returns them with munmap. A
# training step frees tensors of tens of MiB every iteration: each is unmapped, mapped again
# and page-faulted in on first touch (zero-filled by the kernel). glibc caps the threshold at
# 32 MiB on 64-bit, and ConvNeXt-V2-tiny's stage-0 MLP tensors at batch 8 are 36.75 MiB: with
# that cap they still cost 140-210k page faults a step. So no mmap at all (mmap_max=0: every
# block from the heap) and no trimming: freed memory is reused from the heap.
# For a process that is launched: GLIBC_TUNABLES below (docs/performance.md); in-process, the
# benchmark sets the same with mallopt. mallopt takes a C int, so its trim threshold is 2 GiB - 1
# (an earlier 4 GiB wrapped to 0 through ctypes: trim everything, the opposite). The tunable is
# a size_t and is given 4 GiB. Measured with either form: 0-1 page faults in a ConvNeXt-V2-tiny
# training step, against 140-210k with glibc's defaults (docs/performance.md).
MMAP_MAX = 0
TRIM_THRESHOLD = 2 ** 31 - 1
GLIBC_TUNABLES = f'glibc.malloc.mmap_max={MMAP_MAX}:glibc.malloc.trim_threshold={4 * 2 ** 30}'
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # from glibc's malloc.h


def tune_glibc_malloc() -> bool:
    """Apply the documented malloc setting to this process (glibc's ``mallopt``); returns
    False where the C library is not glibc (the setting is then left alone)."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = True
    for param, value in ((_M_MMAP_MAX, MMAP_MAX), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if not -2 ** 31 <= value < 2 ** 31:  # ctypes would wrap it silently
            raise ValueError(f'mallopt value {value} does not fit a C int')
        ok &= libc.mallopt(param, value) == 1
    return bool(ok)


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim``): with trimming
    off, the models of the timing phase would stay resident through the memory phase, whose
    spawned processes then share the machine with them. False where the C library is not glibc."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc.malloc_trim(0) == 1


def allocator_description(tuned: bool) -> str:
    if tuned:
        return f'glibc malloc, mallopt mmap_max={MMAP_MAX}, trim_threshold={TRIM_THRESHOLD}'
    env = os.environ.get('GLIBC_TUNABLES')
    preload = os.environ.get('LD_PRELOAD')
    return ', '.join(filter(None, ['malloc as launched', env and f'GLIBC_TUNABLES={env}',
                                   preload and f'LD_PRELOAD={preload}']))


# -- one method, ready to step --------------------------------------------------------------
class TrainCase:
    """Backbone + linear head + AdamW for one method, with a fixed batch; ``step()`` is one
    training step (forward, loss, backward, optimizer step)."""

    def __init__(self, method: str, cfg: BenchConfig, compiled: bool | None = None) -> None:
        """``compiled``: torch.compile the backbone (default: ``cfg.compile``)."""
        self.method = method
        self.device = cfg.resolved_device()
        torch.manual_seed(cfg.seed)
        backbone = ConvNeXtV2(arch=cfg.arch, out_indices=(3,),
                              recompute_adapter_inputs=cfg.recompute_adapter_inputs
                              ).to(self.device)
        inject_adapters(backbone, method_configs()[method])
        self.trainable = count_parameters(backbone)['trainable']
        self.backbone = backbone
        compiled = cfg.compile if compiled is None else compiled
        self.model: Callable = torch.compile(backbone) if compiled else backbone
        self.head = nn.Linear(backbone.out_channels[-1], 10).to(self.device)
        params = [p for p in backbone.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params + list(self.head.parameters()), lr=1e-4)
        g = torch.Generator().manual_seed(cfg.seed)
        self.x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g).to(self.device)
        self.y = torch.randint(0, 10, (cfg.batch,), generator=g).to(self.device)
        # the physical limit: nothing in the backbone trains, but gradients reach its input
        self.x.requires_grad_(method == 'Floor')
        self.bf16 = cfg.bf16

    def forward_loss(self) -> torch.Tensor:
        """The step's forward: the loss, with its graph."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.model(self.x)[-1]
            logits = self.head(feats.mean((2, 3)))
        return F.cross_entropy(logits.float(), self.y)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        self.forward_loss().backward()
        self.opt.step()


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def balanced_orders(n: int) -> list[list[int]]:
    """Rows of a balanced Latin square (Williams design) on ``range(n)``: over the rows every
    index runs once in each position and directly after every other index equally often
    (n rows for even n, 2n for odd n). A step's time can depend on the step before it (caches,
    the allocator's free lists); a plain rotation keeps the cyclic order, so each method would
    always follow the same one."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    rows = [[(v + shift) % n for v in first] for shift in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


def interleaved_times(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                      device: torch.device, progress: Callable[[str], None] | None = None
                      ) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each function, ``{name: {'wall': [...], 'cpu': [...]}}``:
    ``warmup + rounds`` rounds, each calling every function once in the order of the next row
    of ``balanced_orders``; warm-up rounds are dropped."""
    names = list(fns)
    orders = balanced_orders(len(names))
    times: dict[str, dict[str, list[float]]] = {n: dict(wall=[], cpu=[]) for n in names}
    last: dict[str, float] = {}
    for r in range(warmup + rounds):
        for name in (names[i] for i in orders[r % len(orders)]):
            wall, cpu = _timed(fns[name], device)
            last[name] = wall
            if r >= warmup:
                times[name]['wall'].append(wall)
                times[name]['cpu'].append(cpu)
        if progress:
            kind = f'warm-up {r + 1}' if r < warmup else f'round {r + 1 - warmup}'
            progress(f'{kind}: ' + ', '.join(f'{n} {last[n]:.2f}s' for n in names))
    return times


def merged_inference_times(cfg: BenchConfig, progress: Callable[[str], None] | None = None
                           ) -> dict[str, list[float]]:
    """Forward (no grad, eval) of the plain backbone against FLoRA injected and merged."""
    device = cfg.resolved_device()
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=g).to(device)
    models = {}
    for name in ('plain', 'FLoRA merged'):
        torch.manual_seed(cfg.seed)
        model = ConvNeXtV2(arch=cfg.arch, out_indices=(3,)).to(device).eval()
        if name != 'plain':
            inject_adapters(model, method_configs()['FLoRA'])
            merge_adapters(model)
        models[name] = torch.compile(model) if cfg.compile else model

    def forward(model: Callable) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=cfg.bf16):
                model(x)
        return run
    return interleaved_times({n: forward(m) for n, m in models.items()}, cfg.rounds,
                             cfg.warmup, device, progress)


def saved_activation_mib(case: TrainCase) -> float:
    """MiB that autograd keeps for the backward of one step (unique storages, parameters not
    counted): the activation memory a method adds, exact and independent of the allocator.

    Counted when the forward is done, over the saved tensors the graph still holds: a tensor
    saved for a graph that was dropped within the forward, or for one built and freed inside
    backward (ops that rebuild a weight there), is not kept for backward, and its freed
    address may be reused by another storage, so counting at pack time would miscount."""
    params = {p.untyped_storage().data_ptr() for p in case.backbone.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in case.head.parameters()}
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            packed.append(weakref.ref(t))  # the graph holds t while it needs it
        return t

    # the lean ConvNeXt blocks' own hooks hide what adapters keep from the hooks above: they
    # report it themselves
    stats = case.backbone.recompute_stats = RecomputeStats()
    case.x.grad = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = case.forward_loss()
    finally:
        case.backbone.recompute_stats = None
    seen = {}
    for ref in packed + stats.kept_tensors:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss  # the graph, unused
    return sum(seen.values()) / 2 ** 20


# -- arithmetic ------------------------------------------------------------------------------
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None,
                        **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: each gradient it computes costs the forward's
    multiply-adds, whatever the groups. torch's own formula (``torch.utils.flop_counter``,
    2.14) builds the weight gradient's count from the batch/channel-transposed shapes and skips
    the groups, which counts a depthwise conv's weight gradient C times over (ConvNeXt-V2-tiny's
    Full step came out at 620 instead of 214 GFLOP)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(case: TrainCase) -> int:
    """Floating-point operations of the matrix products and convolutions in one training step
    (forward and backward, multiply-add = 2), counted by torch's ``FlopCounterMode`` on the ops
    that actually run, with the conv weight-gradient formula corrected for groups.
    Elementwise work (norms, activations, the optimizer) is not counted."""
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        case.step()
    return counter.get_total_flops()


# -- peak memory, one process per method ----------------------------------------------------
def _status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024  # kB


def _live_bytes(case: TrainCase) -> int:
    """Bytes of the tensors that outlive a step: weights, buffers, optimizer state, the batch."""
    tensors = [*case.backbone.parameters(), *case.backbone.buffers(), *case.head.parameters(),
               case.x, case.y]
    for state in case.opt.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _step_peak_bytes(case: TrainCase) -> int:
    """Most bytes torch's CPU allocator holds at once during one step, above the step's start:
    the running sum of the profiler's allocation records (every alloc and free, in order)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def _peak_memory_worker(method: str, cfg_dict: dict) -> dict[str, float]:
    cfg = BenchConfig(**cfg_dict)
    if cfg.tune_malloc:
        tune_glibc_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    if device.type == 'cpu':
        # forget the start-up peak (imports): Linux resets VmHWM to the current RSS on '5'
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        start = _status_mib('VmRSS')
    case = TrainCase(method, cfg)
    for _ in range(3):  # AdamW's state exists from the first step on
        case.step()
    _sync(device)
    if device.type == 'cuda':
        return dict(allocated=torch.cuda.max_memory_allocated(device) / 2 ** 20)
    rss = _status_mib('VmHWM') - start  # before the profiler's own allocations
    # the CPU twin of CUDA's peak allocated: what outlives a step plus the step's own peak.
    # Gradients and the input's gradient are dropped first so that the step frees nothing
    # the profiler did not see allocated.
    case.opt.zero_grad(set_to_none=True)
    case.x.grad = None
    allocated = _live_bytes(case) + _step_peak_bytes(case)
    return dict(allocated=allocated / 2 ** 20, rss=rss)


def peak_memory_mib(method: str, cfg: BenchConfig) -> dict[str, float]:
    """Peak memory of a few training steps of ``method``, in a fresh spawned process:
    ``allocated`` (CUDA's max_memory_allocated, or on the CPU the same quantity from the
    profiler's allocation records) and on the CPU ``rss``, the peak resident set above the
    process's size before the model was built (allocator overheads included)."""
    ctx = multiprocessing.get_context('spawn')
    # the child's profiler (kineto) would print its start/stop stages to stderr: silence them
    # in the child only (it reads the variable when torch loads)
    previous = os.environ.get('KINETO_LOG_LEVEL')
    os.environ['KINETO_LOG_LEVEL'] = '6'
    try:
        with ctx.Pool(1) as pool:
            return pool.apply(_peak_memory_worker, (method, asdict(cfg)))
    finally:
        if previous is None:
            del os.environ['KINETO_LOG_LEVEL']
        else:
            os.environ['KINETO_LOG_LEVEL'] = previous


# -- the whole benchmark --------------------------------------------------------------------
@dataclass
class BenchResult:
    config: dict
    machine: dict
    rows: list[dict] = field(default_factory=list)
    inference: dict | None = None


def machine_info(cfg: BenchConfig, tuned: bool) -> dict:
    device = cfg.resolved_device()
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name')), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                device=str(device), allocator=allocator_description(tuned),
                load_average_start=os.getloadavg())
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(cfg: BenchConfig, progress: Callable[[str], None] | None = None
                  ) -> BenchResult:
    """Time every method interleaved, then merged inference, then peak memory per method."""
    tuned = cfg.tune_malloc and tune_glibc_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = BenchResult(config=asdict(cfg), machine=machine_info(cfg, tuned))
    device = cfg.resolved_device()
    cases = {}
    for method in cfg.methods:
        cases[method] = TrainCase(method, cfg)
        if cfg.compile:  # its eager twin, timed in the same rounds: what compiling gains
            cases[EAGER + method] = TrainCase(method, cfg, compiled=False)
        if progress:
            progress(f'built {method}')
    times = interleaved_times({m: c.step for m, c in cases.items()}, cfg.rounds, cfg.warmup,
                              device, progress)
    trainable = {m: c.trainable for m, c in cases.items()}
    saved = {m: saved_activation_mib(c) for m, c in cases.items() if not m.startswith(EAGER)}
    # counted on the eager backbone: a compiled one runs generated kernels, not aten ops
    flops = {m: step_flops(cases.get(EAGER + m, cases[m])) for m in cfg.methods}
    del cases
    gc.collect()
    release_free_heap()
    medians = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    for method in cfg.methods:
        med = medians[method]
        row = dict(method=method, label=LABELS.get(method, method), trainable=trainable[method],
                   s_step=med['wall'], cpu_s_step=med['cpu'], saved_mib=saved[method],
                   gflop=flops[method] / 1e9, times=times[method])
        if cfg.compile:
            eager = medians[EAGER + method]
            row.update(eager_s_step=eager['wall'], eager_cpu_s_step=eager['cpu'],
                       eager_times=times[EAGER + method],
                       compiled_x_eager=med[cfg.clock] / eager[cfg.clock])
        for ref in ('Floor', 'LoRA', 'Full'):
            if ref in medians:
                row[f'x_{ref}'] = med[cfg.clock] / medians[ref][cfg.clock]
                row[f'flop_x_{ref}'] = flops[method] / flops[ref]
        result.rows.append(row)
    if cfg.inference:
        inf = merged_inference_times(cfg, progress)
        plain, merged = (statistics.median(inf[k][cfg.clock]) for k in ('plain', 'FLoRA merged'))
        result.inference = dict(plain_s=plain, merged_s=merged, ratio=merged / plain, times=inf)
    if cfg.memory:
        for row in result.rows:
            peak = peak_memory_mib(row['method'], cfg)
            row['peak_mib'] = peak['allocated']
            if 'rss' in peak:
                row['peak_rss_mib'] = peak['rss']
            if progress:
                progress(f'peak memory {row["method"]}: {row["peak_mib"]:.0f} MiB allocated'
                         + (f', {peak["rss"]:.0f} MiB resident' if 'rss' in peak else ''))
        peaks = {r['method']: r['peak_mib'] for r in result.rows}
        for row in result.rows:
            for ref in ('Floor', 'LoRA', 'Full'):
                if ref in peaks:
                    row[f'mem_x_{ref}'] = row['peak_mib'] / peaks[ref]
    result.machine['load_average_end'] = os.getloadavg()
    return result


def format_table(result: BenchResult) -> str:
    """A Markdown table of the run, with the setting and machine above it."""
    cfg, mach = result.config, result.machine
    lines = [f'ConvNeXt-V2-{cfg["arch"]}, batch {cfg["batch"]} x {cfg["size"]}px, '
             f'{mach["device"]}{" bf16 autocast" if cfg["bf16"] else ""}'
             f'{", torch.compile" if cfg["compile"] else ""}'
             f'{"" if cfg.get("recompute_adapter_inputs", True) else ", adapters keep inputs"}'
             f'; median of {cfg["rounds"]} '
             f'interleaved rounds after {cfg["warmup"]} warm-up; ratios on the {cfg["clock"]} '
             'clock',
             f'{mach["cpu"]} ({mach["cpu_count"]} cores, {mach["torch_threads"]} torch threads)'
             f'{", " + mach["gpu"] if "gpu" in mach else ""}; torch {mach["torch"]}; '
             f'{mach["allocator"]}; load average {mach["load_average_start"][0]:.1f} at start, '
             f'{mach["load_average_end"][0]:.1f} at the end',
             '']
    refs = [r for r in ('Floor', 'LoRA', 'Full') if any(row['method'] == r for row in result.rows)]
    mem = any('peak_mib' in row for row in result.rows)
    clock = 'CPU' if cfg['clock'] == 'cpu' else 'wall'
    compiled = any('eager_s_step' in row for row in result.rows)
    header = ['method', 'trainable', 'wall s/step', 'CPU s/step'] + [
        f'x {r} ({clock})' for r in refs] + ['saved for backward MiB', 'GFLOP/step'] + [
        f'GFLOP x {r}' for r in refs if r != 'LoRA']
    header += ['eager wall s/step', f'compiled x eager ({clock})'] if compiled else []
    rss = any('peak_rss_mib' in row for row in result.rows)
    if mem:
        header += ['peak allocated MiB'] + (['mem x Floor'] if 'Floor' in refs else [])
        header += ['peak resident MiB'] if rss else []
    lines += ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for row in result.rows:
        cells = [row['label'], f'{row["trainable"]:,}', f'{row["s_step"]:.3f}',
                 f'{row["cpu_s_step"]:.3f}']
        cells += [f'{row[f"x_{r}"]:.2f}' for r in refs] + [f'{row["saved_mib"]:.0f}',
                                                          f'{row["gflop"]:.1f}']
        cells += [f'{row[f"flop_x_{r}"]:.2f}' for r in refs if r != 'LoRA']
        if compiled:
            cells += [f'{row["eager_s_step"]:.3f}', f'{row["compiled_x_eager"]:.2f}']
        if mem:
            cells.append(f'{row["peak_mib"]:.0f}')
            if 'Floor' in refs:
                cells.append(f'{row["mem_x_Floor"]:.3f}')
            if rss:
                cells.append(f'{row.get("peak_rss_mib", float("nan")):.0f}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    if result.inference:
        inf = result.inference
        lines += ['', f'Inference (eval, no grad, {clock} clock): plain backbone '
                      f'{inf["plain_s"]:.3f} s, FLoRA merged {inf["merged_s"]:.3f} s = '
                      f'{inf["ratio"]:.3f}x plain']
    return '\n'.join(lines)


def plot_result(result: BenchResult, path: str) -> None:
    """Bar charts of time, arithmetic and peak memory per method, Floor marked (needs
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError('--plot needs matplotlib, which is not installed') from err
    rows = result.rows
    labels = [r['label'] for r in rows]
    clock = result.config['clock']
    panels = [('cpu_s_step' if clock == 'cpu' else 's_step',
               f'seconds per training step ({"CPU time" if clock == "cpu" else "wall"})',
               'x_Floor')]
    if all('gflop' in r for r in rows):  # what a step computes, beside what it takes
        panels.append(('gflop', 'arithmetic per step (GFLOP, matmuls and convs)',
                       'flop_x_Floor'))
    if all('peak_mib' in r for r in rows):
        panels.append(('peak_mib', 'peak memory allocated (MiB)', 'mem_x_Floor'))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.5 * len(rows) + 2),
                             squeeze=False)
    colors = ['#9e9e9e' if r['method'] in ('Floor', 'Frozen') else
              '#d62728' if r['method'] == 'FLoRA' else
              '#ff9896' if r['method'] == 'FLoRA-ref' else '#1f77b4' for r in rows]
    floor = next((r for r in rows if r['method'] == 'Floor'), None)
    for ax, (key, title, ratio) in zip(axes[0], panels):
        values = [r[key] for r in rows]
        ypos = range(len(rows))
        ax.barh(ypos, values, color=colors)
        ax.set_yticks(list(ypos), labels)
        ax.invert_yaxis()
        ax.set_xlabel(title)
        top = max(values)
        for y, r in zip(ypos, rows):
            # three significant figures: a small model's 0.4 GFLOP must not print as 0
            text = f'{r[key]:.3g}' if key in ('peak_mib', 'gflop') else f'{r[key]:.2f}'
            if ratio in r:
                text += f'  ({r[ratio]:.2f}x Floor)'
            # a white box: the Floor line must not run through a shorter bar's label
            ax.text(r[key] + top * 0.01, y, text, va='center', fontsize=9, zorder=3,
                    bbox=dict(facecolor='white', edgecolor='none', pad=1))
        ax.set_xlim(0, top * 1.45)
        if floor is not None:
            ax.axvline(floor[key], color='k', linestyle='--', linewidth=1)
            ax.text(floor[key], len(rows) - 0.4, ' Floor', fontsize=9, va='top')
        ax.grid(axis='x', alpha=0.3)
    cfg = result.config
    fig.suptitle(f'ConvNeXt-V2-{cfg["arch"]}, batch {cfg["batch"]}, {cfg["size"]}px, '
                 f'{result.machine["device"]}{", bf16" if cfg["bf16"] else ""}'
                 f'{", compiled" if cfg["compile"] else ""} (median of {cfg["rounds"]} rounds)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
