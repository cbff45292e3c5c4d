"""Time, arithmetic and peak memory of a PEFT training step, against the physical limit.

    python tools/benchmark.py [--arch tiny] [--batch 8] [--size 224] [--rounds 6]
        [--methods Floor LoRA FLoRA ...] [--compile] [--bf16] [--json OUT] [--plot OUT.png]

The methods are timed interleaved in one process (median per method after a warm-up) and
compared with ``Floor`` (frozen backbone, gradients to the input), LoRA and Full; each step's
FLOPs are counted on the ops it runs; peak memory is measured per method in its own process.
See flora_mm/harness/benchmark.py and docs/performance.md for what is measured and the allocator
setting.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from flora_mm.cli._args import nonnegative_int, positive_int
from flora_mm.harness.benchmark import (METHODS, BenchConfig, format_table, plot_result,
                                        run_benchmark)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='tiny', help='ConvNeXt-V2 size: atto ... huge')
    p.add_argument('--batch', type=positive_int, default=8)
    p.add_argument('--size', type=positive_int, default=224, help='input side in pixels')
    p.add_argument('--rounds', type=positive_int, default=6,
                   help='timed rounds (median per method)')
    p.add_argument('--warmup', type=nonnegative_int, default=2, help='untimed rounds first')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                   metavar='METHOD', help=f'rows to measure, of {", ".join(METHODS)}')
    p.add_argument('--device', default='auto', help='auto (CUDA if present), cpu or cuda[:N]')
    p.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                   help='clock of the ratios; cpu (process CPU time) for a shared CPU machine')
    p.add_argument('--threads', type=positive_int,
                   help="torch's intra-op threads (default: torch's)")
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CUDA)')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile every backbone; each is timed beside its eager twin in '
                        'the same rounds (column compiled x eager)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory processes')
    p.add_argument('--no-inference', action='store_true', help='skip merged inference')
    p.add_argument('--keep-adapter-inputs', action='store_true',
                   help='adapters keep their inputs for backward instead of rebuilding them '
                        '(the memory/time trade-off of recompute_adapter_inputs)')
    p.add_argument('--malloc-as-launched', action='store_true',
                   help="leave glibc malloc's settings alone (default: the documented tuning)")
    p.add_argument('--json', metavar='OUT', help='write every figure and the setting as JSON')
    p.add_argument('--plot', metavar='OUT.png', help='bar chart of time and memory per method')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    for path in (args.json, args.plot):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            sys.exit(f'error: the folder of {path} does not exist')
    if args.plot and importlib.util.find_spec('matplotlib') is None:
        sys.exit('error: --plot needs matplotlib, which is not installed')
    try:
        cfg = BenchConfig(arch=args.arch, batch=args.batch, size=args.size, rounds=args.rounds,
                          warmup=args.warmup, methods=tuple(args.methods), device=args.device,
                          bf16=args.bf16, compile=args.compile, clock=args.clock,
                          threads=args.threads, memory=not args.no_memory,
                          inference=not args.no_inference,
                          tune_malloc=not args.malloc_as_launched,
                          recompute_adapter_inputs=not args.keep_adapter_inputs)
    except ValueError as err:
        sys.exit(f'error: {err}')
    result = run_benchmark(cfg, progress=lambda msg: print(f'  {msg}', file=sys.stderr,
                                                           flush=True))
    print(format_table(result))
    if args.json:
        with open(args.json + '.part', 'w') as f:
            json.dump(asdict(result), f, indent=1)
        os.replace(args.json + '.part', args.json)  # never a half-written file
    if args.plot:
        plot_result(result, args.plot)


if __name__ == '__main__':
    main()
