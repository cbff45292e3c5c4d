"""Write a sharded (DCP) checkpoint directory as one ordinary mmengine checkpoint file.

    python tools/dcp_to_pth.py CHECKPOINT_DIR OUT.pth [--force]

CHECKPOINT_DIR is what a sharded run with ``model_wrapper_cfg.save_format='dcp'`` writes
(``iter_N.pth/``: ``.metadata``, one ``__R_0.distcp`` per rank, ``extra_state.pth``). OUT gets
the same dict the gathered format writes (full tensors, the optimizer state keyed by parameter
names, meta, message hub, schedulers), written atomically. flora_mm's own tools (tools/test.py,
tools/merge_adapters.py, --resume, load_from) read the directory as it is; the file is for code
that reads files only (vanilla mmdet / mmseg / mmrotate). Runs in one process, holds the whole
model in memory, reads the directory without unpickling objects
(``flora_mm.checkpoint.dcp_to_file``).
"""
import argparse
import sys
from typing import Optional, Sequence

from flora_mm.checkpoint import CheckpointError, dcp_to_file


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help='the DCP checkpoint directory (iter_N.pth/)')
    parser.add_argument('out', help='the .pth file to write')
    parser.add_argument('--force', action='store_true', help='replace OUT if it exists')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        checkpoint = dcp_to_file(args.checkpoint, args.out, force=args.force)
    except (CheckpointError, OSError, ValueError) as err:
        sys.exit(f'dcp_to_pth: error: {err}')
    tensors = checkpoint.get('state_dict', {})
    meta = checkpoint.get('meta', {})
    print(f'wrote {args.out}: {len(tensors)} tensors, '
          f'{sum(t.numel() for t in tensors.values()):,} elements, epoch {meta.get("epoch")}, '
          f'iter {meta.get("iter")}, optimizer state: {"optimizer" in checkpoint}')


if __name__ == '__main__':
    main()
