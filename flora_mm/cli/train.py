"""Train a model from an mmdet, mmseg or mmrotate config (picked by its ``default_scope``).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Same arguments and behaviour as the OpenMMLab packages' tools/train.py
(``flora_mm.apis.train``).
"""
import argparse
from typing import Optional, Sequence

from flora_mm.apis import add_runner_args, parse_with_local_rank, train
from flora_mm.apis.config import leave_process_group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector / segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='If specify checkpoint path, resume from it, while if not specify, try to auto '
        'resume from the latest checkpoint in the work directory.')
    add_runner_args(parser)
    return parse_with_local_rank(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    train(args.config, work_dir=args.work_dir, resume=args.resume, amp=args.amp,
          auto_scale_lr=args.auto_scale_lr, cfg_options=args.cfg_options,
          launcher=args.launcher)
    leave_process_group()  # all ranks end together (gloo)


if __name__ == '__main__':
    main()
