"""Count total and trainable parameters of a config's model (the paper's "# Params").

    python tools/count_params.py CONFIG [--cfg-options k=v ...] [--json]
    python tools/count_params.py CONFIG --budget 12.9M|0.66% [--methods ...] [--kernel-ranks ...]

The model is built on the meta device with PEFTBackbone's ``load_pretrained=False``: no tensor
memory and no checkpoint file, so ConvNeXt-V2-L and InternViT-6B configs take seconds. Prints
total / trainable per top-level part (backbone with its PEFT method, neck, heads) and the
backbone's adapter bookkeeping; ``--json`` prints the same as JSON (``flora_mm.apis.count``).
With ``--budget``: for every rank method, the rank (FLoRA: and kernel rank) whose adapter count
on this config's backbone is closest to the budget, and that count (``flora_mm.apis.budget``,
docs/compare.md).
"""
import argparse
import json
from typing import Optional, Sequence


from flora_mm.apis.budget import format_solutions, rank_methods, solve_all
from flora_mm.apis.count import count_params, format_counts, logs_to_stderr
from flora_mm.cli._args import add_cfg_options, budget, positive_int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file path')
    add_cfg_options(parser)
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    parser.add_argument('--budget', type=budget, help='a parameter count (12.9M, 500K) or a share '
                        'of the pretrained backbone (0.66%%): print the closest rank per method')
    parser.add_argument('--methods', nargs='+', default=list(rank_methods()),
                        help='methods to solve --budget for (default: %(default)s)')
    parser.add_argument('--kernel-ranks', nargs='+', type=positive_int,
                        help='FLoRA kernel ranks --budget may pick (default: 1 2)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logs_to_stderr()
    if args.budget:
        solutions = solve_all(args.config, args.budget, methods=args.methods,
                              kernel_ranks=args.kernel_ranks, cfg_options=args.cfg_options)
        print(json.dumps([s.as_dict() for s in solutions], indent=2) if args.json
              else f'{args.config}: budget {args.budget}\n{format_solutions(solutions)}')
        return
    counts = count_params(args.config, args.cfg_options)
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))


if __name__ == '__main__':
    main()
