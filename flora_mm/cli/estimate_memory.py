"""Per-GPU static memory of a config's training run (parameters, gradients, optimizer states).

    python tools/estimate_memory.py CONFIG [CONFIG ...] [--gpus N] [--strategy ddp|fsdp]
        [--device-gib 80] [--cfg-options k=v ...] [--json]
    python tools/estimate_memory.py CONFIG [CONFIG ...] --table [--gpus 1 8]

Builds the model on the meta device (no memory, no checkpoint); ``--strategy`` defaults to the
config's own (FSDP when its ``model_wrapper_cfg`` is ``FullyShardedModel``). Activations are not
included. ``--table``: one markdown row per config, total GiB per GPU under DDP and FSDP for
each ``--gpus`` value ('!' = above --device-gib). See flora_mm/apis/memory.py for what each
figure counts.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence


from flora_mm.apis.config import load_config
from flora_mm.apis.count import logs_to_stderr
from flora_mm.apis.memory import (STRATEGIES, format_plan, format_table,
                                  plan_config, plan_table)
from flora_mm.cli._args import add_cfg_options, finite_float, positive_int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='+', help='config file path(s)')
    parser.add_argument('--gpus', type=positive_int, nargs='+', default=None,
                        help='number of GPUs (ranks); several values with --table '
                        '(default: 1, or 1 8 with --table)')
    parser.add_argument('--strategy', choices=STRATEGIES, default=None,
                        help="ddp or fsdp (default: the config's own)")
    parser.add_argument('--device-gib', type=finite_float(gt=0), default=80.0,
                        help='memory of one GPU, for the fits / does not fit verdict')
    add_cfg_options(parser)
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    parser.add_argument('--table', action='store_true',
                        help='markdown table over DDP/FSDP and every --gpus value')
    args = parser.parse_args(argv)
    args.gpus = args.gpus or ([1, 8] if args.table else [1])
    if any(g < 1 for g in args.gpus):
        parser.error(f'--gpus must be >= 1, got {args.gpus}')
    if len(args.gpus) > 1 and not args.table:
        parser.error('several --gpus values need --table')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logs_to_stderr()
    out, rows = [], []
    for path in args.configs:
        cfg = load_config(path, args.cfg_options)
        if args.table:
            strategies = [args.strategy] if args.strategy else list(STRATEGIES)
            rows.append((path, plan_table(cfg, args.gpus, strategies)))
        else:
            out.append((path, plan_config(cfg, gpus=args.gpus[0], strategy=args.strategy)))
    if args.table:
        print(format_table(rows, args.device_gib))
        return
    if args.json:
        print(json.dumps({p: plan.as_dict() for p, plan in out}, indent=2))
    else:
        print('\n'.join(format_plan(p, plan, args.device_gib) for p, plan in out))


if __name__ == '__main__':
    main()
