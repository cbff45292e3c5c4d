"""Per-GPU static memory of a config's training run (parameters, gradients, optimizer states).

    python tools/estimate_memory.py CONFIG [CONFIG ...] [--gpus N] [--strategy ddp|fsdp]
        [--device-gib 80] [--host-overhead-gib G] [--cfg-options k=v ...] [--json]
    python tools/estimate_memory.py CONFIG [CONFIG ...] --table [--gpus 1 8]

Builds the model on the meta device (no memory, no checkpoint); ``--strategy`` defaults to the
config's own (FSDP when its ``model_wrapper_cfg`` is ``FullyShardedModel``). Activations are not
included. ``--table``: one markdown row per config, total GiB per GPU under DDP and FSDP for
each ``--gpus`` value ('!' = above --device-gib). See flora_mm/apis/memory.py for what each
figure counts.

Sharded (FSDP) plans also give the host side: each rank's peak host RSS at the start and at a
checkpoint save for the config's ``model_wrapper_cfg.meta_init`` and save format
(flora_mm/apis/host_memory.py; the table adds rank 0's, the largest, per FSDP column). The
process's own overhead is ``--host-overhead-gib``, by default this process's resident set after
importing the stack and building the model (docs/sharding.md "Host memory" compares it with
measured runs).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import torch

from flora_mm.apis.config import load_config
from flora_mm.apis.count import logs_to_stderr
from flora_mm.apis.host_memory import config_host_plan, format_host
from flora_mm.apis.memory import (STRATEGIES, build_meta_model, format_plan, format_table,
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
    parser.add_argument('--host-overhead-gib', type=finite_float(ge=0), default=None,
                        help="host RAM of a training process before the model's share "
                        "(default: this process's resident set after building the model)")
    parser.add_argument('--pretrained-dtype', choices=('bfloat16', 'float16', 'float32'),
                        default=None, help="dtype of the config's pretrained file where it is "
                        "not on disk (default: the model's own; InternVL's releases: bfloat16)")
    parser.add_argument('--host-device', choices=('cuda', 'cpu'), default='cuda',
                        help='where the shards live: cuda (GPU runs), cpu (gloo on the CPU: '
                        "every rank's shard is host memory too)")
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
    overhead = None if args.host_overhead_gib is None else int(args.host_overhead_gib * 2**30)
    file_dtype = getattr(torch, args.pretrained_dtype) if args.pretrained_dtype else None
    for path in args.configs:
        cfg = load_config(path, args.cfg_options)
        model = build_meta_model(cfg)
        if args.table:
            strategies = [args.strategy] if args.strategy else list(STRATEGIES)
            plans = plan_table(cfg, args.gpus, strategies, model=model)
            hosts = {g: config_host_plan(cfg, g, model=model, overhead=overhead,
                                         file_dtype=file_dtype, device=args.host_device)
                     for s, g in plans if s == 'fsdp'}
            rows.append((path, plans, hosts))
        else:
            plan = plan_config(cfg, gpus=args.gpus[0], strategy=args.strategy, model=model)
            host = (config_host_plan(cfg, args.gpus[0], model=model, overhead=overhead,
                                     file_dtype=file_dtype, device=args.host_device)
                    if plan.strategy == 'fsdp' else None)
            out.append((path, plan, host))
    if args.table:
        print(format_table([(p, plans) for p, plans, _ in rows], args.device_gib,
                           host={p: hosts for p, _, hosts in rows}))
        return
    if args.json:
        print(json.dumps({p: dict(plan.as_dict(), host=host) for p, plan, host in out},
                         indent=2))
    else:
        print('\n'.join(format_plan(p, plan, args.device_gib)
                        + ('\n' + format_host(host) if host else '') for p, plan, host in out))


if __name__ == '__main__':
    main()
