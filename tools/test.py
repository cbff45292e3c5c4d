"""Test (and evaluate) a checkpoint with an mmdet, mmseg or mmrotate config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show]
        [--show-dir DIR] [--wait-time S] [--cfg-options k=v ...] [--launcher ...] [--tta]

Same arguments and behaviour as the OpenMMLab packages' tools/test.py; ``--out`` follows the
config's package: a .pkl of predictions for mmdet/mmrotate, a folder of prediction pngs for
mmseg.
"""
import argparse
from typing import Optional, Sequence

import _common as common


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out', type=str,
        help='mmdet/mmrotate: dump predictions to a pickle file for offline evaluation; '
        'mmseg: the directory to save output prediction for offline evaluation')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. If specified, it will be '
        'automatically saved to the work_dir/timestamp/show_dir')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true', help='Test time augmentation')
    common.add_common_args(parser)
    return common.parse_with_local_rank(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = common.load_config(args)
    scope = common.get_scope(cfg)
    common.setup_dynamo(scope)
    common.register_scope(scope)

    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        cfg = common.trigger_visualization_hook(cfg, args)
    if args.tta:
        common.enable_tta(cfg)
    if args.out is not None and scope == 'mmseg':
        common.set_out(cfg, args.out)

    runner = common.build_runner(cfg)
    if args.out is not None and scope != 'mmseg':
        common.add_dump_metric(runner, scope, args.out)
    runner.test()


if __name__ == '__main__':
    main()
