"""``PEFTBackbone``: any registered backbone, pretrained, with a PEFT method injected.

It is a builder, not a wrapper class: it returns the inner backbone object itself with its layers
adapted, so the model's state-dict keys under ``backbone.`` are exactly the plain backbone's (plus
the adapter tensors beside them). Key mapping, for the record:

    plain checkpoint                      injected model
    backbone.<path>.weight / .bias   ->   backbone.<path>.weight / .bias   (unchanged)
    (none)                                backbone.<path>.flora_core, .flora_factors.N,
                                          .lora_A, .lora_B, .dora_magnitude (adapter tensors)

So plain checkpoints load unchanged, and a merged model saves back to plain keys by dropping the
adapter tensors (``flora_mm.peft.remove_adapters``).

Order matters for mmengine: the Runner builds the model (here: build, load pretrained, inject,
freeze) before it wraps it in DDP and before ``train()`` builds the optimizer, so both see the
adapter tensors. ``init_weights()`` has already run, so the Runner's later ``init_weights`` call
skips the backbone; if it does load pretrained weights later (``load_pretrained=False``), the
adapters re-derive what depends on W0 (DoRA's magnitude) right after.
"""
from __future__ import annotations

import types

from mmengine.logging import print_log
from torch import nn

from ..peft import build_peft_method, count_parameters, reset_adapters_from_base
from ..registry import MODELS
from .descriptions import describe


def _init_then_reset(self: nn.Module) -> None:
    type(self).init_weights(self)
    reset_adapters_from_base(self)


def without_weights(backbone: dict) -> dict:
    """A backbone config that reads no weights while it is built: OpenMMLab's ``pretrained``
    (a path, or True for timm's ``TIMMBackbone``) is read at construction, before
    ``init_weights``; counting and testing a full checkpoint read none."""
    return dict(backbone, pretrained=None) if backbone.get('pretrained') else dict(backbone)


def with_saved_modules(peft: dict, backbone: nn.Module,
                       modules_to_save: list[str] | None = None) -> dict:
    """``peft`` with the backbone's new modules (``modules_to_save``, or the description's)
    added to the method's own ``modules_to_save``."""
    saved = describe(backbone).modules_to_save() if modules_to_save is None else modules_to_save
    if not saved:
        return dict(peft)
    return dict(peft, modules_to_save=list(peft.get('modules_to_save', [])) + list(saved))


@MODELS.register_module(name='PEFTBackbone')
def build_peft_backbone(backbone: dict, peft: dict, load_pretrained: bool = True,
                        modules_to_save: list[str] | None = None) -> nn.Module:
    """``backbone=dict(type='PEFTBackbone', backbone=dict(type=...), peft=dict(type=...))``.

    ``load_pretrained``: run the inner backbone's ``init_weights()`` (its ``init_cfg``, e.g.
    ``dict(type='Pretrained', checkpoint=...)``) before injecting, and keep its ``pretrained``
    argument. Test-time tools and counting turn it off: the checkpoint under test provides
    every weight, and a count reads none.
    ``modules_to_save``: regexes of backbone parts that the pretrained checkpoint lacks (output
    norms, InternViT's simple FPN); they train fully under every method, added to the method's
    own ``modules_to_save``. By default the backbone's description names them
    (``flora_mm.models.describe``), so configs do not; a list here replaces that.
    """
    build_peft_method(peft)  # validate before building anything large
    inner = MODELS.build(backbone if load_pretrained else without_weights(backbone))
    method = build_peft_method(with_saved_modules(peft, inner, modules_to_save))
    # built on the meta device (the sharded start): nothing to load into; the pretrained file is
    # read once on rank 0 after sharding (FullyShardedModel(meta_init=True))
    on_meta = any(p.is_meta for p in inner.parameters())
    if load_pretrained and hasattr(inner, 'init_weights') and not on_meta:
        inner.init_weights()
    inner._flora_load_pretrained = load_pretrained  # the meta-device start reads it only then
    names = method.inject(inner)
    if hasattr(inner, 'init_weights'):
        inner.init_weights = types.MethodType(_init_then_reset, inner)
    counts = count_parameters(inner)
    print_log(f'PEFTBackbone: {method.name} on {type(inner).__name__}: {len(names)} layers '
              f'adapted, {counts["trainable"]:,} of {counts["total"]:,} backbone parameters '
              'trainable', logger='current')
    return inner
