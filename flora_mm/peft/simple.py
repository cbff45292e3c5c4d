"""Methods that add no tensors, only choose what trains: BitFit, Full and Frozen ("Base")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..registry import PEFT_METHODS
from .base import PEFTMethod


@PEFT_METHODS.register_module()
@dataclass
class BitFit(PEFTMethod):
    """Biases of the targeted layers train; everything else in the module is frozen."""

    table_order: ClassVar[float] = 2
    plot_style: ClassVar = ('#2ca02c', '^')

    def trainable_parameter_names(self, module: nn.Module, layer_names: list[str]) -> list[str]:
        return [f'{n}.bias' for n in layer_names
                if getattr(module.get_submodule(n), 'bias', None) is not None]


@PEFT_METHODS.register_module()
@dataclass
class Full(PEFTMethod):
    """Full fine-tuning: every parameter of the module trains."""

    uses_targets: ClassVar[bool] = False
    label: ClassVar[str] = 'Fully FT'
    table_order: ClassVar[float] = 1
    plot_style: ClassVar = ('#555555', 's')

    def trainable_parameter_names(self, module: nn.Module, layer_names: list[str]) -> list[str]:
        return [n for n, _ in module.named_parameters()]


@PEFT_METHODS.register_module(name=['Frozen', 'Base'])
@dataclass
class Frozen(PEFTMethod):
    """The paper's "Base": the module is frozen, only what lies outside it (heads) trains."""

    uses_targets: ClassVar[bool] = False
    trains_module: ClassVar[bool] = False
    label: ClassVar[str] = 'Base'
    table_order: ClassVar[float] = 0
    plot_style: ClassVar = ('k', None)

    def trainable_parameter_names(self, module: nn.Module, layer_names: list[str]) -> list[str]:
        return []
