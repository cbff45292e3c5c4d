"""DoRA (Liu et al. 2024): W' = m * V / ||V||, V = W0 + (alpha/r) B A.

The norm is taken per output channel (over all other dims) and detached, as the DoRA paper's
§4.3 recommends, so no gradient flows through it. ``m`` starts at W0's norms (no change at
injection). Every path runs ONE op with W' — no second full conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .lora import DEFAULT_ALPHA, LoRALayer, _LowRankMatrixMethod


def _channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel L2 norm, shaped to broadcast against the weight."""
    return weight.flatten(1).norm(dim=1).view(-1, *([1] * (weight.dim() - 1)))


class DoRALayer(LoRALayer):
    adapter_prefixes = ('lora_A', 'lora_B', 'dora_magnitude')

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = DEFAULT_ALPHA,
                 dropout: float = 0.0) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.dora_magnitude = nn.Parameter(torch.empty(self.weight.shape[0],
                                                       device=self.weight.device,
                                                       dtype=torch.float32))
        self._merge_factor: torch.Tensor | None = None
        self.reset_from_base()

    @torch.no_grad()
    def reset_from_base(self) -> None:
        """m = ||W0|| per output channel; call again after W0 is (re)loaded."""
        self.dora_magnitude.copy_(_channel_norm(self.weight.float()).flatten())

    def _factor(self, directional: torch.Tensor) -> torch.Tensor:
        norm = _channel_norm(directional).detach()
        return self.dora_magnitude.view_as(norm) / norm

    def adapted_weight(self) -> torch.Tensor:
        directional = self.weight.float() + self.scaling * self.lora_matrix()
        return (self._factor(directional) * directional).to(self.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        directional = self.weight.float() + self.scaling * self.lora_matrix()
        return self._factor(directional) * directional - self.weight.float()

    def factored_rank(self) -> None:
        return None  # the norm needs the full matrix: run one op with W'

    def factored_conv_rank(self) -> None:
        return None  # likewise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_op(x, self.weight, self.bias)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # peft's form: m/||V|| * (W0 x + s B A drop(x)); the dropped input needs its own op
            directional = self.weight.float() + self.scaling * self.lora_matrix()
            factor = self._factor(directional)
            w_main = (factor * self.weight.float()).to(self.weight.dtype)
            w_lora = (factor * self.scaling * self.lora_matrix()).to(self.weight.dtype)
            return self.base_op(x, w_main, self.bias) + self.base_op(self.dropout(x), w_lora, None)
        return self.base_op(x, self.adapted_weight(), self.bias)

    def _merged_weight(self) -> torch.Tensor:
        directional = self.weight.float() + self.scaling * self.lora_matrix()
        self._merge_factor = self._factor(directional)
        return self._merge_factor * directional

    def _unmerged_weight(self) -> torch.Tensor:
        # W' = f * (W0 + dL)  =>  W0 = W' / f - dL, with f cached at merge (as peft does)
        assert self._merge_factor is not None
        return self.weight.float() / self._merge_factor - self.scaling * self.lora_matrix()


@PEFT_METHODS.register_module()
@dataclass
class DoRA(_LowRankMatrixMethod):
    """LoRA's ``rank``/``alpha``/``dropout`` plus a trainable magnitude per output channel."""

    layer_cls: ClassVar = DoRALayer
    table_order: ClassVar[float] = 4
    plot_style: ClassVar = ('#ff7f0e', 'D')
