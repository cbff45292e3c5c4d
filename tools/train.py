"""Train a model from an mmdet, mmseg or mmrotate config (picked by its ``default_scope``).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
        [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

Same arguments and behaviour as the OpenMMLab packages' tools/train.py.
"""
import argparse
from typing import Optional, Sequence

import _common as common


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
    common.add_common_args(parser)
    return common.parse_with_local_rank(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = common.load_config(args)
    scope = common.get_scope(cfg)
    common.setup_dynamo(scope)
    common.register_scope(scope)

    if args.amp:
        common.enable_amp(cfg)
    if args.auto_scale_lr:
        common.enable_auto_scale_lr(cfg)
    common.apply_resume(cfg, args.resume)

    runner = common.build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
