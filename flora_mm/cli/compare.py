"""Compare PEFT methods at matched parameter budgets (the paper's Table 1 / Table 2 / Fig. 2).

    # every method on one base config, LoRA/DoRA/FLoRA at two budgets (ranks solved)
    python tools/compare.py configs/coco/convnextv2_flora_r16.py \\
        --methods Frozen Full BitFit LoRA DoRA FLoRA --budgets 12.9M 25.9M --out work_dirs/cmp
    # or a list of configs as they are
    python tools/compare.py configs/ade20k/internvit6b_{lora,flora}_0.66pct.py --out work_dirs/6b

Each run trains with python -m flora_mm.cli.train (with --gpus N > 1 torchrun, as
tools/dist_train.sh) and tests with flora_mm.cli.test in <out>/<task>/<run>/; finished runs are skipped, so re-running resumes. Writes
<out>/compare.{md,csv,json,png} and prints the table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import flora_mm  # noqa: F401  (compat shims before any OpenMMLab import)
from flora_mm.cli._args import budget, finite_float, port, positive_int
from flora_mm.harness.compare import DOTA_IOU_THRS, CompareError, RunOptions, compare


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('configs', nargs='+', help='configs to compare, or base configs with '
                        '--methods')
    parser.add_argument('--out', default='work_dirs/compare', help='output folder')
    parser.add_argument('--methods', nargs='+', help='PEFT methods to run on every config '
                        '(any registered: Frozen, Full, BitFit, LoRA, DoRA, FLoRA, '
                        'LoCon, LoHa, LoKr)')
    parser.add_argument('--budgets', nargs='+', type=budget, help='budgets for the rank methods: '
                        'counts (12.9M, 500K) or shares of the backbone (0.66%%)')
    parser.add_argument('--kernel-ranks', nargs='+', type=positive_int,
                        help='FLoRA kernel ranks the solver may pick (default 1 2)')
    parser.add_argument('--gpus', type=positive_int, default=1,
                        help='processes per run; > 1 launches torchrun (as tools/dist_{train,test}.sh)')
    parser.add_argument('--max-epochs', type=positive_int,
                        help='train epoch-based configs for this many epochs')
    parser.add_argument('--max-iters', type=positive_int,
                        help='train iteration-based configs for this many iterations')
    parser.add_argument('--jobs', type=positive_int, default=1,
                        help='runs at once (CPU threads are shared between them)')
    parser.add_argument('--no-train-val', action='store_true',
                        help='no validation during training (the test run evaluates)')
    parser.add_argument('--train-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='--cfg-options passed to every training run')
    parser.add_argument('--port', type=port, default=29500, help='torchrun port with --gpus > 1')
    parser.add_argument('--dota-iou-thrs', nargs='+', type=finite_float(gt=0, le=1),
                        default=DOTA_IOU_THRS,
                        help='IoU thresholds DOTA runs are tested at (default: 0.5:0.95, the '
                        "paper's mAP; e.g. 0.5 0.75 for AP50/AP75 only, much faster on CPU)")
    parser.add_argument('--cwd', help='folder the runs start in: relative paths in the configs '
                        '(data roots, checkpoints) resolve against it (default: this folder)')
    args = parser.parse_args(argv)
    if args.budgets and not args.methods:
        parser.error('--budgets needs --methods (a list of configs brings its own ranks)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    options = RunOptions(gpus=args.gpus, max_epochs=args.max_epochs, max_iters=args.max_iters,
                         train_options=args.train_options, train_val=not args.no_train_val,
                         jobs=args.jobs, port=args.port, cwd=args.cwd)
    try:
        out = compare(args.configs, args.out, methods=args.methods, budgets=args.budgets,
                      kernel_ranks=args.kernel_ranks, options=options,
                      dota_iou_thrs=args.dota_iou_thrs)
    except CompareError as err:
        print(f'compare: {err}', file=sys.stderr)
        return 1
    print()
    print(out['markdown'])
    for path in out['files'].values():
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
