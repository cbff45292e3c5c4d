"""What the backbones' blocks share to rebuild their adapters' inputs in backward inside
their own forward (``flora_mm.ops.recomputed_input`` is the mechanism)."""
from __future__ import annotations

import torch

from ..ops.recomputed_input import RecomputeStats


class LeanBlock:
    """Mixin of the backbones' blocks that run ``run_with_recomputed_input`` in their own
    forward (``forward(x, lean=True)``). Being the block's forward, the lean path runs inside
    the module's call: its hooks run around it, and so do FSDP2's unshard and reshard when the
    block is a ``fully_shard`` unit."""

    #: what the lean path does is counted here (tests, benchmark); set it on the backbone
    #: (``RecomputeStatsAttribute``), which hands it to its blocks
    recompute_stats: RecomputeStats | None = None


class RecomputeStatsAttribute:
    """A backbone's ``recompute_stats``: setting it also sets it on every ``LeanBlock``
    inside, which counts in its own forward (the blocks are reached only through their call,
    e.g. as FSDP2 units)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = '_' + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__.get(self.key)

    def __set__(self, obj: torch.nn.Module, stats: RecomputeStats | None) -> None:
        obj.__dict__[self.key] = stats
        for module in obj.modules():
            if isinstance(module, LeanBlock):
                module.recompute_stats = stats


def has_call_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or torch's global module hooks).

    A block computes some submodules' forward itself instead of calling them (a plain conv
    through a faster kernel); it does so only for modules without hooks, so nothing registered
    on them is skipped.
    """
    from torch.nn.modules import module as torch_module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)
