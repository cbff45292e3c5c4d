"""Test (and evaluate) a checkpoint with an mmdet, mmseg or mmrotate config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show]
        [--show-dir DIR] [--wait-time S] [--cfg-options k=v ...] [--launcher ...] [--tta]

Same arguments and behaviour as the OpenMMLab packages' tools/test.py (``flora_mm.apis.test``);
``--out`` follows the config's package: a .pkl of predictions for mmdet/mmrotate, a folder of
prediction pngs for mmseg.
"""
import argparse
from typing import Optional, Sequence

from flora_mm.apis import add_runner_args, parse_with_local_rank, test
from flora_mm.apis.config import leave_process_group


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (.pth), or an adapter file '
                        '(*_adapter.safetensors + .json) evaluated on the pretrained base')
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
    add_runner_args(parser)
    return parse_with_local_rank(parser, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    test(args.config, args.checkpoint, work_dir=args.work_dir, out=args.out, show=args.show,
         show_dir=args.show_dir, wait_time=args.wait_time, tta=args.tta,
         cfg_options=args.cfg_options, launcher=args.launcher)
    leave_process_group()  # all ranks end together (gloo)


if __name__ == '__main__':
    main()
