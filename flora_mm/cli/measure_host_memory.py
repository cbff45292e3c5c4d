"""Measured peak host RSS per rank of sharded training at start, load and save.

    python tools/measure_host_memory.py --out work_dirs/host_memory [--procs 2]
        [--methods flora full] [--starts gathered meta] [--save-formats full dcp]

See flora_mm/harness/host_memory.py (what runs and what is recorded) and docs/sharding.md
("Host memory").
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flora_mm.cli._args import finite_float, positive_int
from flora_mm.harness.host_memory import METHODS, SAVE_FORMATS, STARTS, arch_dict, measure

__all__ = ['main', 'parse_args']


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='work_dirs/host_memory', help='output folder')
    parser.add_argument('--procs', type=positive_int, default=2, help='gloo processes')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
    parser.add_argument('--starts', nargs='+', choices=STARTS, default=list(STARTS))
    parser.add_argument('--save-formats', nargs='+', choices=SAVE_FORMATS, default=['full'])
    parser.add_argument('--save-format-option', default='model_wrapper_cfg.save_format',
                        help='the config key that selects the save format (dcp runs)')
    parser.add_argument('--embed-dim', type=positive_int, default=1536)
    parser.add_argument('--depth', type=positive_int, default=14)
    parser.add_argument('--num-heads', type=positive_int, default=16)
    parser.add_argument('--dtype', choices=('bfloat16', 'float32'), default='bfloat16',
                        help='storage dtype of the backbone and the pretrained file')
    parser.add_argument('--no-load', action='store_true', help='skip the resume runs')
    parser.add_argument('--project', nargs='*', type=positive_int, default=None,
                        metavar='GPUS', help='no runs: print the projection of the '
                        'InternViT-6B configs (Full, FLoRA) on these GPU counts (default 8 16)')
    parser.add_argument('--host-overhead-gib', type=finite_float(ge=0), default=None,
                        help="with --project: the process overhead (default: this process's "
                        'RSS after building the model, as tools/estimate_memory.py)')
    parser.add_argument('--report-only', action='store_true',
                        help='no runs: rebuild the tables of the variants measured in --out')
    parser.add_argument('--min-available-gib', type=finite_float(gt=0), default=10.0)
    parser.add_argument('--wait-s', type=finite_float(ge=0), default=600.0)
    parser.add_argument('--timeout-s', type=finite_float(gt=0), default=1800.0)
    parser.add_argument('--python', default=sys.executable)
    args = parser.parse_args(argv)
    try:
        args.arch = arch_dict(args.embed_dim, args.depth, args.num_heads)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    return measure(parse_args(argv), argv)

if __name__ == '__main__':
    main()
