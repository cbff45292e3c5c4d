"""Count total and trainable parameters of a config's model (the paper's "# Params").

    python tools/count_params.py CONFIG [--cfg-options k=v ...] [--json]

The model is built on the meta device with PEFTBackbone's ``load_pretrained=False``: no tensor
memory and no checkpoint file, so ConvNeXt-V2-L and InternViT-6B configs take seconds. Prints
total / trainable per top-level part (backbone with its PEFT method, neck, heads) and the
backbone's adapter bookkeeping; ``--json`` prints the same as JSON (``flora_mm.apis.count``).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's flora_mm

from mmengine.config import DictAction  # noqa: E402

from flora_mm.apis.count import count_params, format_counts, logs_to_stderr  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file path')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs (as train.py)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logs_to_stderr()
    counts = count_params(args.config, args.cfg_options)
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))


if __name__ == '__main__':
    main()
