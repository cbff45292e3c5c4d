"""Generate the tiny COCO / ADE20K / DOTA datasets (real on-disk formats) under --out.

    python tools/make_tiny_data.py --out data/tiny --tasks coco ade20k dota

Deterministic: the same --seed gives byte-identical annotation files. Each dataset folder is
replaced atomically, so it is safe to re-run. Also writes the stand-in "pretrained" backbone
checkpoints the tiny configs load (<out>/checkpoints/, flora_mm.datasets.checkpoints) unless
--no-checkpoints (``flora_mm.apis.make_tiny_data``).
"""
import argparse

from flora_mm.apis.demo import make_tiny_data
from flora_mm.cli._args import int_range, positive_int
from flora_mm.datasets.tiny import DEFAULT_ROOT, TASKS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=DEFAULT_ROOT, help='root folder (default %(default)s)')
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS)
    parser.add_argument('--seed', type=int_range(0, 2 ** 63 - 1, name='seed'), default=0)
    parser.add_argument('--num-train', type=positive_int, default=24)
    parser.add_argument('--num-val', type=positive_int, default=8)
    parser.add_argument('--no-checkpoints', action='store_true',
                        help='skip the stand-in pretrained backbone checkpoints')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    written = make_tiny_data(args.out, tasks=args.tasks, seed=args.seed,
                             num_train=args.num_train, num_val=args.num_val,
                             checkpoints=not args.no_checkpoints)
    for name, path in written.items():
        print(f'{name}: {path}')


if __name__ == '__main__':
    main()
