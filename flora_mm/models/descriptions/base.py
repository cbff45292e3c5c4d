"""What the engine knows about a backbone, in one registered description per backbone class.

The optimizer constructor (layer ids for layer-wise / stage-wise learning-rate decay), the
sharding (which modules become FSDP units), the update-norm logs (stage names), PEFTBackbone
(modules the pretrained checkpoint lacks) and the merged export (the vanilla class to write)
ask :func:`describe`; none of them tests a backbone's class. A description is a small class,
registered once for the backbone classes it describes (by their import path, so registering
imports nothing); subclasses of a described class (mmdet's ``ResNetV1d`` and ``ResNeXt`` under
``ResNet``, the classes ``fully_shard`` makes) find it through their MRO. A backbone without a
description gets :class:`BackboneDescription` itself: what can be derived safely, and a clear
error where nothing can (layer decay).

Names handed to a description are relative to the backbone (``stages.2.blocks.5.mlp.fc1``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

from torch import nn

#: description class by the import path of each backbone class it describes
_DESCRIPTIONS: dict[str, type['BackboneDescription']] = {}


def class_path(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def register_description(*class_paths: str) -> Callable[[type], type]:
    """``@register_description('mmdet.models.backbones.resnet.ResNet')`` on a description
    class: it describes those backbone classes and their subclasses."""
    def wrap(desc: type[BackboneDescription]) -> type[BackboneDescription]:
        for path in class_paths:
            _DESCRIPTIONS[path] = desc
        return desc
    return wrap


def describe(backbone: nn.Module) -> 'BackboneDescription':
    """The description of ``backbone``'s class (the nearest registered one in its MRO)."""
    for cls in type(backbone).__mro__:
        desc = _DESCRIPTIONS.get(class_path(cls))
        if desc is not None:
            return desc(backbone)
    return BackboneDescription(backbone)


@dataclass
class Export:
    """A merged backbone in its vanilla OpenMMLab form."""

    #: the backbone config (``type`` with its package scope, e.g. 'mmpretrain.ConvNeXt')
    cfg: dict
    #: its state dict (keys relative to the backbone)
    state: dict
    #: modules a config must import to build it (``custom_imports``)
    imports: list = field(default_factory=list)
    #: the package's own layer-decay optimizer constructor for it, by default scope, if any
    layer_decay_constructor: dict = field(default_factory=dict)


class LayerDecayError(ValueError):
    """Layer-wise decay asked for a backbone whose layer ids are not known."""


class BackboneDescription:
    """The description every backbone gets: what can be derived without knowing the class.

    Subclasses override the class attributes and methods that their backbones answer
    differently; the base answers generically or raises a :class:`LayerDecayError` that names
    the backbone and how to describe it.
    """

    #: regexes (``re.search`` on module names) of the modules that become one FSDP unit each:
    #: the repeated blocks and the stem / patch embedding. The generic ones below match the
    #: usual container names; a description lists its backbone's own.
    unit_patterns: ClassVar[tuple[str, ...]] = (
        r'(^|\.)(blocks|layers)\.\d+$', r'(^|\.)patch_embed$', r'(^|\.)stem$')
    #: regex whose group 1 names the stage of a layer (``update_norm/<stage>``); layers that
    #: match nothing are grouped under 'other'
    stage_pattern: ClassVar[str] = r'^((?:stages|layers|blocks)\.\d+)'
    #: the decay types :meth:`layer_id` answers ('layer_wise', 'stage_wise')
    decay_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    @property
    def name(self) -> str:
        return type(self.backbone).__name__

    # -- learning-rate decay ------------------------------------------------------------------
    def layer_id(self, name: str, num_layers: int, decay_type: str) -> tuple[int, bool]:
        """Layer id of the backbone parameter ``name`` for ``decay_type`` (0 = the input end,
        ``num_layers`` = the last layer), with the reference implementation's semantics, and
        whether ``name`` is one of the pretrained layers (not a new norm / FPN, which take the
        heads' id ``num_layers + 1``)."""
        raise LayerDecayError(
            f'layer-wise learning-rate decay does not know the layers of {self.name} '
            f'({class_path(type(self.backbone))}): register a description for it '
            '(flora_mm.models.register_description, see docs/backbones.md), or train it '
            'without layer decay (optim_wrapper without constructor=\'LayerDecayOptimWrapper'
            'Constructor\'; paramwise_cfg.custom_keys as in mmdet\'s Swin recipe)')

    def check_decay_type(self, decay_type: str) -> None:
        if self.decay_types and decay_type not in self.decay_types:
            raise LayerDecayError(f'{self.name} has no {decay_type!r} rule: use one of '
                                  f'{list(self.decay_types)}')

    # -- sharding -----------------------------------------------------------------------------
    def units(self) -> list[str]:
        """Names of the modules that become FSDP units (relative to the backbone)."""
        compiled = [re.compile(p) for p in self.unit_patterns]
        return [n for n, _ in self.backbone.named_modules()
                if n and any(c.search(n) for c in compiled)]

    # -- logs ---------------------------------------------------------------------------------
    def stage_of(self, name: str) -> str:
        """The stage a layer belongs to, for ``update_norm/<stage>``."""
        match = re.search(self.stage_pattern, name)
        return match.group(1) if match else 'other'

    # -- PEFT ---------------------------------------------------------------------------------
    def modules_to_save(self) -> list[str]:
        """Regexes of the modules the pretrained checkpoint lacks (new output norms, a
        simple FPN): they train fully under every method."""
        return []

    # -- export -------------------------------------------------------------------------------
    def export(self, state: dict, cfg: dict) -> Export | None:
        """The vanilla OpenMMLab form of the merged backbone (``state``: its state dict,
        ``cfg``: its config), or None where its class is already an OpenMMLab one."""
        return None


def matching(names: Iterable[str], pattern: str) -> list[str]:
    compiled = re.compile(pattern)
    return [n for n in names if compiled.search(n)]
