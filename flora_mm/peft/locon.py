"""LoCon (LyCORIS ``locon``): LoRA for convolutions, optionally Tucker-2 on the channel modes.

Weight W0 of shape (out, in/groups, k_1, ..., k_d) (a conv) or (out, in) (a linear); scaling
``s = alpha / r`` (``alpha=None``: alpha = r, scaling 1).

- ``tucker=False``: ``dW = s * up @ down`` with down (r x in/groups*k_1*...*k_d) and up
  (out x r), reshaped to W0's shape: LoRA on the reshaped conv (LyCORIS's ``lora_down`` as a
  k x k conv in -> r, ``lora_up`` as a 1x1 conv r -> out).
- ``tucker=True`` (the default here; LyCORIS's ``use_tucker``): for a conv with a kernel larger
  than 1 x ... x 1, ``dW[o, i, k...] = s * sum_{a,b} up[o, a] mid[a, b, k...] down[b, i]``
  with down (r x in/groups), mid (r x r x k_1 x ... x k_d), up (out x r): Tucker-2 on the two
  channel modes with the spatial modes kept whole, i.e. for groups=1 the chain of a 1x1 conv
  (in -> r), a full k x k conv (r -> r, the layer's stride/padding/dilation) and a 1x1 conv
  (r -> out). Unlike LyCORIS, each of the core's two ranks is clamped to its mode's size
  (min(r, out), min(r, in/groups)): the same updates, without the r x r x k... core that a
  depthwise conv (input mode 1) would otherwise carry for an update of rank 1 in that mode.
  Linears and 1x1 convs have no spatial mode to keep: there ``tucker`` changes nothing (as in
  LyCORIS) and the update is the plain low-rank one above.

Grouped and depthwise convs: the update has the weight's own shape, so its input mode is
in_channels / groups (1 for a depthwise conv): down is r x (in/groups)[*k...], and the update is
one dW shared by the groups' blocks exactly as W0 is. It merges exactly. (LyCORIS built its down
projection over the full in_channels, which does not match a grouped weight: LyCORIS #260.)

Init (LyCORIS): down and mid kaiming-uniform (a = sqrt(5), fan-in of the conv kernels they
stand for: in/groups*k... for a plain down, in/groups for Tucker's 1x1 down, r*k... for mid),
up = 0, so injection changes no output. Ranks are not clamped (as LoRA here and LyCORIS).

Forms: linears run ``x W0^T + s (x down^T) up^T`` on wide layers (``linear_factors``);
groups=1 zero-padded convs on small maps run down / mid / up as three thin convs
(``conv_factors``); everything else one op with W0 + dW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import PEFT_METHODS
from .base import AdapterLayer, LinearFactors, check_bool, kaiming_uniform_
from .lora import DEFAULT_ALPHA, _LowRankMatrixMethod, lora_sq_norm


class LoConLayer(AdapterLayer):
    adapter_prefixes = ('lora_down', 'lora_mid', 'lora_up')

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = DEFAULT_ALPHA,
                 dropout: float = 0.0, tucker: bool = True) -> None:
        super().__init__(base, dropout=dropout)
        shape = tuple(self.weight.shape)
        self.rank = int(rank)
        self.scaling = (float(alpha) if alpha is not None else float(rank)) / self.rank
        # only a kernel larger than 1 has a spatial structure to keep (LyCORIS: the same rule)
        self.tucker = bool(tucker) and any(k != 1 for k in shape[2:])
        dev = self.weight.device

        def param(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*size, device=dev, dtype=torch.float32))

        if self.tucker:
            # the core's channel ranks clamped to their modes (a depthwise conv's input mode is
            # 1: an r x r core there would hold r^2 k... numbers for an r x k... update)
            r_out, r_in = min(self.rank, shape[0]), min(self.rank, shape[1])
            self.clamped = [(m, self.rank, size) for m, size in enumerate(shape[:2])
                            if self.rank > size]
            self.lora_down = param(r_in, shape[1])
            self.lora_mid = param(r_out, r_in, *shape[2:])
        else:
            r_out = self.rank
            self.lora_down = param(self.rank, math.prod(shape[1:]))
            self.register_parameter('lora_mid', None)
        self.lora_up = param(shape[0], r_out)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """LyCORIS's init: down (and mid) kaiming-uniform, up = 0."""
        kaiming_uniform_(self.lora_down)
        if self.lora_mid is not None:
            kaiming_uniform_(self.lora_mid)
        self.lora_up.zero_()

    def delta_weight(self) -> torch.Tensor:
        if self.lora_mid is None:
            return (self.scaling * (self.lora_up @ self.lora_down)).view(self.weight.shape)
        # (mid contracted with down over b) then up over a: one out-sized matrix product last
        inner = (self.lora_mid.movedim(1, -1) @ self.lora_down)       # (a, k..., i)
        inner = inner.movedim(-1, 1).reshape(self.lora_mid.shape[0], -1)  # (a, i*k...)
        return (self.scaling * self.lora_up @ inner).view(self.weight.shape)

    # -- factored forms ---------------------------------------------------------------------
    def factored_rank(self) -> int | None:
        return self.rank if self.kind == 'Linear' else None

    def linear_factors(self) -> LinearFactors:
        """x dW^T = s (x down^T) up^T."""
        return LinearFactors(self.lora_down.transpose(0, 1), None,
                             self.lora_up.transpose(0, 1), self.scaling)

    def factored_conv_rank(self) -> int | None:
        if self.kind == 'Linear':
            return None
        return self.rank if self.lora_mid is None else max(self.lora_mid.shape[:2])

    def conv_factors(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """Tucker: down as a 1x1 conv (in -> r), mid as the r -> r kernel, s*up as a 1x1 conv;
        plain: down as an r-channel conv with the layer's kernel, s*up as a 1x1 conv."""
        if self.kind == 'Linear':
            return None
        ones = (1,) * (self.weight.dim() - 2)
        up = (self.scaling * self.lora_up).view(*self.lora_up.shape, *ones)
        if self.lora_mid is None:
            return None, self.lora_down.view(self.rank, *self.weight.shape[1:]), up
        return self.lora_down.view(*self.lora_down.shape, *ones), self.lora_mid, up

    def closed_form_sq_norm(self) -> torch.Tensor:
        """Plain: ``lora_sq_norm``. Tucker: ``s^2 sum_k <mid_k, G mid_k H>`` with the r x r
        Grams G = up^T up and H = down down^T; no weight-sized tensor is built."""
        if self.lora_mid is None:
            return lora_sq_norm(self.lora_down, self.lora_up, self.scaling)
        up, down, mid = self.lora_up.float(), self.lora_down.float(), self.lora_mid.float()
        gram_up, gram_down = up.transpose(0, 1) @ up, down @ down.transpose(0, 1)
        mid = mid.reshape(*mid.shape[:2], -1)
        return self.scaling ** 2 * torch.einsum('abk,ac,bd,cdk->', mid, gram_up, gram_down, mid)


@PEFT_METHODS.register_module()
@dataclass
class LoCon(_LowRankMatrixMethod):
    """LyCORIS's LoCon: ``rank`` r, ``alpha`` (scaling alpha / r; default 8 as peft's LoRA,
    None: alpha = r), ``tucker`` (default True: 1x1 / k x k core / 1x1 on convs with a kernel;
    False: LoRA on the reshaped conv, which is what LoRA here already is)."""

    tucker: bool = True

    layer_cls: ClassVar = LoConLayer
    layer_fields: ClassVar = ('rank', 'alpha', 'dropout', 'tucker')
    table_order: ClassVar[float] = 5.25
    plot_style: ClassVar = ('#8c564b', 'v')

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        super().validate_layer_cfg(cfg, where)
        check_bool(cfg, 'tucker', where)
