"""Merge trained adapters into the base weights; write a checkpoint vanilla OpenMMLab code loads.

    python tools/merge_adapters.py CONFIG CHECKPOINT OUT [--adapter] [--plain-keys] [--force]
        [--no-verify] [--cfg-options k=v ...]

CHECKPOINT is either
  * a full checkpoint written by tools/train.py (``epoch_N.pth`` / ``iter_N.pth``), or
  * an adapter-only checkpoint written by FLoRAHook (``*_adapter.safetensors`` + its ``.json``;
    chosen by ``--adapter`` or by the ``.safetensors`` suffix). The frozen base weights then come
    from the config's pretrained backbone ``init_cfg`` (override its path with --cfg-options
    model.backbone.backbone.init_cfg.checkpoint=...); the sidecar's fingerprint must match them.

OUT gets ``{'state_dict', 'meta'}`` with the adapters merged (W0 + s*dW) and no adapter tensors;
it holds only tensors and plain Python values, so even torch.load(weights_only=True) reads it.
``<OUT without extension>.py`` gets the config to load it with: the original config with
PEFTBackbone replaced by the plain backbone, and without FLoRAHook.

Backbones:
  * ConvNeXtV2 -> mmpretrain's ``ConvNeXt`` (``use_grn=True, layer_scale_init_value=0.,
    gap_before_final_norm=False``), keys converted from timm's names to mmpretrain's; the
    written config imports ``mmpretrain.models`` instead of flora_mm, so vanilla
    mmdet / mmseg / mmrotate + mmpretrain (1.2.0) load it without flora_mm.
  * InternViT: OpenMMLab has no InternViT class, so the written config keeps flora_mm's
    ``InternViT`` type (plain keys, no adapters, no PEFTBackbone) and still imports flora_mm.
  * ``--plain-keys`` keeps flora_mm's ConvNeXtV2 the same way (timm key names).
  * A backbone adapted by ``FLoRAHook(peft=...)`` keeps its own type and key names.

Unless --no-verify, the backbone as written (mmpretrain's ConvNeXt, or the merged module) is run
on a random image and compared with the adapted backbone before merging
(``flora_mm.apis.merge``).
"""
import argparse
import sys
from typing import Optional, Sequence

from flora_mm.apis.merge import MergeError, format_summary, merge
from flora_mm.cli._args import add_cfg_options


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog=__doc__.split('\n\n', 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='full .pth of tools/train.py, or *_adapter.safetensors')
    parser.add_argument('out', help='merged checkpoint to write, a .pth path (its config: same '
                        'name, .py)')
    parser.add_argument('--adapter', action='store_true',
                        help='CHECKPOINT is adapter-only (default: when it ends in .safetensors)')
    parser.add_argument('--plain-keys', action='store_true',
                        help="keep flora_mm's ConvNeXtV2 type and timm key names (needs flora_mm "
                             'to load) instead of converting to mmpretrain ConvNeXt')
    parser.add_argument('--force', action='store_true', help='overwrite OUT and its config')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip comparing the written backbone with the adapted one')
    add_cfg_options(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        summary = merge(args.config, args.checkpoint, args.out, adapter=args.adapter,
                        plain_keys=args.plain_keys, force=args.force, check=not args.no_verify,
                        cfg_options=args.cfg_options)
    except (MergeError, FileNotFoundError) as err:
        sys.exit(f'merge_adapters: error: {err}')
    print(format_summary(summary))


if __name__ == '__main__':
    main()
