"""Stand-in "pretrained" checkpoints for the tiny configs, in the real on-disk formats.

Nothing can be downloaded here, so the tiny configs load these through the same code path as
the real ConvNeXt-V2 / InternViT files: ConvNeXt-V2-atto in timm's key layout, the tiny
InternViT in InternVL's layout under a ``model`` key. The weights are random (seeded).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..utils.fileio import atomic_paths


def _save(obj, path: Path) -> None:
    with atomic_paths(path) as (tmp,):
        torch.save(obj, tmp)


def generate_checkpoints(root: str | os.PathLike = 'data/tiny', seed: int = 0) -> dict[str, Path]:
    """Write ``<root>/checkpoints/{convnextv2_atto.pth, internvit_tiny.pth}``."""
    import timm

    from ..models import InternViT

    out = Path(root) / 'checkpoints'
    torch.manual_seed(seed)
    convnext = timm.create_model('convnextv2_atto', pretrained=False, num_classes=0)
    paths = {'convnextv2_atto': out / 'convnextv2_atto.pth',
             'internvit_tiny': out / 'internvit_tiny.pth'}
    _save(convnext.state_dict(), paths['convnextv2_atto'])
    torch.manual_seed(seed)
    vit = InternViT(arch='tiny', with_fpn=False)
    _save({'model': vit.state_dict()}, paths['internvit_tiny'])
    return paths


def write_internvit_checkpoint(path: str | os.PathLike, arch: dict | str,
                               dtype: str = 'bfloat16', seed: int = 0) -> Path:
    """A random InternViT of ``arch`` (a preset name or a dict of ``INTERNVIT_ARCHS`` keys) in
    InternVL's layout (``{'model': state_dict}``, no FPN), its tensors stored in ``dtype``
    (InternVL's releases are bf16): the pretrained file of the host-memory harness
    (``flora_mm/harness/host_memory.py``), read by the same loader as the real release. The
    model is built whole in fp32 and cast, so writing needs ~6 bytes per parameter of RAM."""
    from ..models import InternViT

    torch.manual_seed(seed)
    vit = InternViT(arch=arch, with_fpn=False, dtype=dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save({'model': vit.state_dict()}, path)
    return path
