"""Training cost of each PEFT method on a ConvNeXt-V2 backbone (the paper's Table 4 quantities).

    python tools/benchmark.py [--arch tiny] [--batch 8] [--size 224] [--iters 10]

Each method runs in its own subprocess (same seed, same input) so peak memory is measured per
method: on CUDA torch's peak allocated memory, on the CPU the process's peak RSS. Prints time
per training step (forward + backward + AdamW step) and peak memory, with ratios to LoRA
measured in the same run. Figures, not assertions: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = dict(types=['Conv2d', 'Linear'])
METHODS = {
    'Frozen': dict(type='Frozen'),
    'BitFit': dict(type='BitFit', targets=TARGETS),
    'LoRA': dict(type='LoRA', rank=16, targets=TARGETS),
    'DoRA': dict(type='DoRA', rank=16, targets=TARGETS),
    'FLoRA': dict(type='FLoRA', rank=16, kernel_rank=2, scale=4.0, targets=TARGETS),
    'Full': dict(type='Full'),
}


def measure(method: str, args: argparse.Namespace) -> dict:
    """One method, in this process: returns ms per step and peak memory in MiB."""
    import torch

    sys.path.insert(0, ROOT)
    from flora_mm.models import ConvNeXtV2
    from flora_mm.peft import count_parameters, inject_adapters

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    backbone = ConvNeXtV2(arch=args.arch, out_indices=(3,)).to(device)
    inject_adapters(backbone, METHODS[method])
    head = torch.nn.Linear(backbone.out_channels[-1], 10).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    dtype = torch.bfloat16 if (args.amp and device.type == 'cuda') else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = head(backbone(x)[-1].mean((2, 3)))
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    counts = count_parameters(backbone)
    return dict(method=method, device=str(device), ms=1000 * statistics.median(times),
                peak_mib=peak, trainable=counts['trainable'])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='tiny', help='ConvNeXt-V2 size (timm name suffix)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--amp', action='store_true', help='bf16 autocast (CUDA only)')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: run a single method
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, '--one', method, '--arch', args.arch, '--batch',
               str(args.batch), '--size', str(args.size), '--iters', str(args.iters),
               '--warmup', str(args.warmup)] + (['--amp'] if args.amp else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f'  measured {method}', file=sys.stderr, flush=True)
    ref = next((r for r in rows if r['method'] == 'LoRA'), rows[0])
    print(f'ConvNeXt-V2-{args.arch}, batch {args.batch} x {args.size}^2, {rows[0]["device"]}, '
          f'median of {args.iters} training steps')
    print(f'{"method":<8}{"trainable":>14}{"ms/step":>10}{"x LoRA":>8}{"peak MiB":>11}{"x LoRA":>8}')
    for r in rows:
        print(f'{r["method"]:<8}{r["trainable"]:>14,}{r["ms"]:>10.1f}{r["ms"] / ref["ms"]:>8.2f}'
              f'{r["peak_mib"]:>11.0f}{r["peak_mib"] / ref["peak_mib"]:>8.2f}')


if __name__ == '__main__':
    main()
