"""The one mechanism every PEFT method shares.

A method is a small config class (validated on creation) registered in ``PEFT_METHODS``; methods
that add tensors also define an :class:`AdapterLayer` subclass. ``PEFTMethod.inject`` selects the
target layers, replaces each by its adapter layer, freezes the module and marks the method's own
tensors trainable.

Adapter layers keep the base layer's parameters under the SAME names (``weight``, ``bias``) and
add their tensors beside them, so plain checkpoints load into an injected model unchanged and a
merged model saves back to plain keys once the adapter keys are dropped.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import nn
from torch.func import functional_call

from ..ops import (cast_conv, cast_matmul, conv2d_forward, factored_linear,
                   linear_or_conv_with_recomputed_weight, recomputed_weight_serves)

# Layer kinds a config may name in ``targets.types``; subclasses (mmcv/mmengine wrappers, timm's
# same-padding convs) match through isinstance.
LAYER_KINDS: dict[str, type[nn.Module]] = {
    'Linear': nn.Linear,
    'Conv1d': nn.Conv1d,
    'Conv2d': nn.Conv2d,
    'Conv3d': nn.Conv3d,
}
#: spatial dims and functional op of the conv kinds
CONV_DIMS = {'Conv1d': 1, 'Conv2d': 2, 'Conv3d': 3}
_CONV_FNS = {'Conv1d': F.conv1d, 'Conv2d': F.conv2d, 'Conv3d': F.conv3d}

# the one attribute an injected module carries (see InjectionState); read it through
# injection_state(), never by name
_STATE_ATTR = '_flora_mm_peft'


class PEFTConfigError(ValueError):
    """A PEFT config that cannot be applied; the message names the offending field."""


def _check_regex_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PEFTConfigError(f'{what} must be a regex string or a list of them, got {value!r}')
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise PEFTConfigError(f'{what}: invalid regex {pattern!r}: {err}') from err
    return list(value)


@dataclass
class TargetSpec:
    """Which layers a method adapts: layer kinds, then name regexes (``re.search``)."""

    types: list[str] = field(default_factory=lambda: list(LAYER_KINDS))
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.types, str):
            self.types = [self.types]
        unknown = [t for t in self.types if t not in LAYER_KINDS]
        if unknown:
            raise PEFTConfigError(
                f'targets.types: unsupported layer kind(s) {unknown}; supported: {list(LAYER_KINDS)}')
        if not self.types:
            raise PEFTConfigError('targets.types must name at least one layer kind')
        self.include = _check_regex_list(self.include, 'targets.include')
        self.exclude = _check_regex_list(self.exclude, 'targets.exclude')

    def matches(self, name: str, module: nn.Module) -> bool:
        if not isinstance(module, tuple(LAYER_KINDS[t] for t in self.types)):
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


def layer_kind(module: nn.Module) -> str:
    for kind, cls in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    raise PEFTConfigError(
        f'cannot adapt a {type(module).__name__}: supported layer kinds are {list(LAYER_KINDS)}')


class LinearFactors(NamedTuple):
    """A linear layer's update as ``x dW^T = scale * ((x @ down) @ core) @ up``: ``down``
    (in x r_in), ``core`` (r_in x r_out, None for the identity), ``up`` (r_out x out). Views of
    the adapter's parameters, not products of them: what the factored op keeps for backward
    is then the parameters themselves (``ops.factored_linear``)."""

    down: torch.Tensor
    core: torch.Tensor | None
    up: torch.Tensor
    scale: float


class AdapterLayer(nn.Module):
    """Base of all adapter layers: runs the base layer's op with an adapted weight.

    The base module is kept as a plain (unregistered) attribute so that the state-dict keys stay
    those of the plain layer; its parameters are re-registered here under the same names.
    Subclasses implement ``delta_weight()`` and may provide ``linear_factors()`` for a factored
    linear path that never builds an out x in matrix.
    """

    #: prefixes of the tensors this layer adds (trainable, saved in adapter checkpoints)
    adapter_prefixes: ClassVar[tuple[str, ...]] = ()
    #: (mode, asked rank, used rank) of every rank clamped to its mode's size (logged once
    #: per injection); methods with ranks set it in their ``__init__``
    clamped: list[tuple[int, int, int]] | tuple = ()

    def __init__(self, base: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, AdapterLayer):
            raise PEFTConfigError('layer already carries an adapter; inject only once')
        self.kind = layer_kind(base)
        object.__setattr__(self, 'base_layer', base)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in base.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        if 'bias' not in self._parameters:
            self.register_parameter('bias', None)
        # Plain nn.Linear / nn.ConvNd run their functional op directly; subclasses that override
        # forward (same-padding convs, mmcv wrappers) are called with the weight swapped in.
        base_cls = LAYER_KINDS[self.kind]
        self._direct = type(base).forward is base_cls.forward
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # -- helpers ------------------------------------------------------------------------------
    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if name.startswith(self.adapter_prefixes):
                yield name, param

    def base_op(self, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's own computation with the given weight (stride, padding, padding_mode,
        dilation and groups are the base layer's)."""
        if self._direct:
            if self.kind == 'Linear':
                return F.linear(x, weight, bias)
            if self.kind == 'Conv2d':
                return conv2d_forward(self.base_layer, x, weight, bias)
            return self.base_layer._conv_forward(x, weight, bias)
        params = {'weight': weight}
        if bias is not None:
            params['bias'] = bias
        return functional_call(self.base_layer, params, (x,))

    def _cast_like(self, delta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return delta if delta.dtype == ref.dtype else delta.to(ref.dtype)

    # -- method hooks -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The scaled update, in the base weight's shape and the adapter's dtype."""
        raise NotImplementedError

    def factored_rank(self) -> int | None:
        """Inner size r of ``linear_factors()``; None where the method has no factored form."""
        return None

    def linear_factors(self) -> LinearFactors:
        """The update of a linear layer as a chain of thin factors (``LinearFactors``)."""
        raise NotImplementedError

    def factored_conv_rank(self) -> int | None:
        """Widest inner size of ``conv_factors()`` (read without computing them); None where
        the method has no factored conv form."""
        return None

    def conv_factors(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """The update of a groups=1 conv as three convs, ``(down, kernel, up)``: ``down`` a
        pointwise (r_in x in x 1...) or None, ``kernel`` (r_out x r_in-or-in x k...) run with the
        layer's stride, padding and dilation, ``up`` a pointwise (out x r_out x 1...), the
        scale folded in. None where the method has no such form."""
        return None

    def adapted_weight(self) -> torch.Tensor:
        """W0 + delta, summed in the adapter's precision, in the base weight's dtype."""
        w0 = self.weight
        delta = self.delta_weight()
        if delta.dtype == w0.dtype:
            return w0 + delta
        return (w0.to(delta.dtype) + delta).to(w0.dtype)

    def reset_from_base(self) -> None:
        """Re-derive any adapter state that depends on W0 (after W0 was loaded)."""

    def closed_form_sq_norm(self) -> torch.Tensor | None:
        """``||delta_weight()||_F^2`` (fp32, 0-dim) from the adapter's own tensors without
        building the full-size update, or None where the method has no such form (then
        ``peft.norms.update_sq_norm`` materialises the update). Called with the adapter's
        tensors gathered (plain tensors, also under FSDP); it must not read the base weight."""
        return None

    # -- forward / merge ----------------------------------------------------------------------
    #: linear layers: 'auto' picks the cheaper of the two exact forms below per layer,
    #: 'factored' or 'materialised' forces one (tests, measurements)
    linear_path: str = 'auto'
    #: 'auto' materialises W0 + dW when in*out <= FACTORED_MIN_RATIO * r * (in + out)
    FACTORED_MIN_RATIO: ClassVar[float] = 8.0

    def uses_factored_linear(self) -> bool:
        """Whether a linear layer runs ``x W0^T + (x down) up`` rather than one GEMM with
        W0 + dW. The factored form adds thin GEMMs over every row of x (~6 memory-bound passes
        over the input and output in forward + backward, r-wide); the materialised one adds one
        weight-gradient GEMM (rows x in x out multiply-adds). The first is cheaper for wide
        layers only; ``FACTORED_MIN_RATIO`` is the measured crossover (docs/performance.md,
        "Figures behind the design choices")."""
        rank = self.factored_rank() if self.kind == 'Linear' else None
        if rank is None or self.linear_path == 'materialised':
            return False
        if self.linear_path == 'factored' or not self._direct:
            return True  # a subclass's own forward keeps the form it always had: base(x) + update
        out_features, in_features = self.weight.shape
        return in_features * out_features > self.FACTORED_MIN_RATIO * rank * (
            in_features + out_features)

    #: convs: 'auto' picks the cheaper of the two exact forms per call (``uses_factored_conv``),
    #: 'factored' or 'materialised' forces one where the layer has a factored form
    conv_path: str = 'auto'

    def uses_factored_conv(self, x: torch.Tensor) -> bool:
        """Whether a groups=1, zero-padded conv runs ``conv(x, W0) + up(kernel(down(x)))``
        rather than one conv with W0 + dW. The materialised form pays a full weight gradient
        (output positions x weight size multiply-adds) and keeps W0 + dW for backward; the
        factored one thin convs over the input and output. Same rule as the linear layers:
        factored when positions_out * weight_size > FACTORED_MIN_RATIO * r * (x.numel() +
        out.numel()) (ConvNeXt's later downsampling convs, where the weight is large next to
        the maps; never the stem)."""
        layer = self.base_layer
        if (self.kind not in CONV_DIMS or self.conv_path == 'materialised' or not self._direct
                or layer.groups != 1 or layer.padding_mode != 'zeros'
                or not isinstance(layer.padding, tuple)):
            return False
        rank = self.factored_conv_rank()
        if rank is None:
            return False
        if self.conv_path == 'factored':
            return True
        dims = CONV_DIMS[self.kind]
        out_size = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
            x.shape[-dims:], layer.padding, layer.dilation, layer.kernel_size, layer.stride)]
        positions_out = math.prod(out_size) * (x.numel() // math.prod(x.shape[-dims - 1:]))
        return positions_out * self.weight.numel() > self.FACTORED_MIN_RATIO * rank * (
            x.numel() + positions_out * self.weight.shape[0])

    def _factored_conv(self, x: torch.Tensor, x_update: torch.Tensor) -> torch.Tensor:
        """``base(x) + up(kernel(down(x_update)))``; the update added into the base output in
        place (a conv does not keep its output for backward)."""
        down, kernel, up = self.conv_factors()
        conv = _CONV_FNS[self.kind]
        layer = self.base_layer
        # fp32 adapters on a low-precision backbone, outside autocast: the first conv casts
        # inside, so that backward keeps the input, not an fp32 copy of it (ops.cast_conv)
        cast = not torch.is_autocast_enabled(x.device.type) and x_update.dtype != kernel.dtype
        h = x_update
        if down is not None:
            h = cast_conv(h, down) if cast else conv(h, down)
        if cast and down is None:
            h = cast_conv(h, kernel, layer.stride, layer.padding, layer.dilation)
        else:
            h = layer._conv_forward(h, kernel, None)
        out = self.base_op(x, self.weight, self.bias)
        update = conv(h, up)
        if update.dtype == out.dtype:
            return out.add_(update)
        return out + update.to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_op(x, self.weight, self.bias)
        dropout = self.training and isinstance(self.dropout, nn.Dropout)
        if self.kind == 'Linear' and self.factored_rank() is not None and (
                dropout or self.uses_factored_linear()):
            return self._factored_linear(x, self.dropout(x))  # nn.Dropout: no-op in eval
        if self.kind != 'Linear' and self.uses_factored_conv(x):
            return self._factored_conv(x, self.dropout(x))
        if dropout:
            # dropout acts on the update's input only: this costs a second op with the update
            delta = self.delta_weight()
            return (self.base_op(x, self.weight, self.bias)
                    + self.base_op(self.dropout(x), self._cast_like(delta, self.weight), None))
        if self.recomputes_weight(x):
            return linear_or_conv_with_recomputed_weight(
                self.base_layer, x, self.adapted_weight(), self.adapted_weight, self.bias,
                self._weight_sources())
        return self.base_op(x, self.adapted_weight(), self.bias)

    def _weight_sources(self) -> tuple[torch.Tensor, ...]:
        """The tensors ``adapted_weight()`` reads: W0 and the adapter's own."""
        return (self.weight, *(p for _, p in self.adapter_parameters()))

    #: rebuild W0 + dW in backward only where it is at least this fraction of the layer
    #: input's size (``recomputes_weight``)
    RECOMPUTE_WEIGHT_MIN_FRACTION: ClassVar[float] = 1 / 16

    def recomputes_weight(self, x: torch.Tensor) -> bool:
        """Whether the materialised form rebuilds W0 + dW in backward instead of keeping it
        (``ops.recomputed_weight``): plain linear/conv layers in training, one dtype, no
        autocast, not under torch.compile (which picks what to keep itself), and a weight of
        at least ``RECOMPUTE_WEIGHT_MIN_FRACTION`` of the input's size. Below that, keeping
        it is little memory next to the layer's activations, and rebuilding costs a fixed
        time of small ops per layer (docs/performance.md, "Figures behind the design
        choices")."""
        if (not torch.is_grad_enabled() or not self._direct
                or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)
                or not recomputed_weight_serves(self.base_layer, x)
                or self.weight.numel() < self.RECOMPUTE_WEIGHT_MIN_FRACTION * x.numel()):
            return False
        sources = self._weight_sources()
        return (any(p.requires_grad for p in sources)
                and all(p.dtype == x.dtype for p in sources)
                and (self.bias is None or self.bias.dtype == x.dtype))

    def _factored_linear(self, x: torch.Tensor, x_update: torch.Tensor) -> torch.Tensor:
        """``base(x) + scale ((x_update @ down) @ core) @ up``, the update accumulated into the
        base GEMM's output in place (no second out-sized tensor and no extra pass over it)."""
        down, core, up, scale = self.linear_factors()
        out_features, in_features = self.weight.shape
        lead = x.shape[:-1]
        rows = x_update.reshape(-1, in_features)
        autocast = torch.is_autocast_enabled(rows.device.type)
        if (not autocast and self._direct and x_update is x
                and rows.dtype == down.dtype == self.weight.dtype == up.dtype
                and (self.bias is None or self.bias.dtype == rows.dtype)):
            # one dtype throughout: the fused op (fewer full-size passes in backward)
            return factored_linear(rows, self.weight, self.bias, down, up, core,
                                   scale).view(*lead, out_features)
        if not autocast and rows.dtype != down.dtype:
            # fp32 adapters on a low-precision backbone: cast inside the product, so backward
            # keeps the input (which the blocks can rebuild), not an fp32 copy of it
            h = cast_matmul(rows, down)
        else:
            h = rows @ down
        # the scale on the smallest tensor: the r x r core, else the rows x r product
        h = h @ (scale * core) if core is not None else h * scale
        if self._direct:
            # 2-D and not a view: in-place on a view would make autograd copy the gradient
            out = F.linear(x.reshape(-1, in_features), self.weight, self.bias)
            if out.dtype == h.dtype == up.dtype:
                return out.addmm_(h, up).view(*lead, out_features)
        else:
            out = self.base_op(x, self.weight, self.bias).reshape(-1, out_features)
        # the update in the adapters' precision, added in the output's
        return (out + (h @ up).to(out.dtype)).view(*lead, out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (computed in fp32); merging twice is a no-op."""
        if self.merged:
            return
        self.weight.copy_(self._merged_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight().to(self.weight.dtype))
        self.merged = False

    def _merged_weight(self) -> torch.Tensor:
        return self.weight.float() + self.delta_weight().float()

    def _unmerged_weight(self) -> torch.Tensor:
        return self.weight.float() - self.delta_weight().float()

    def extra_repr(self) -> str:
        return f'base={type(self.base_layer).__name__}{tuple(self.weight.shape)}, merged={self.merged}'


@dataclass
class PEFTMethod:
    """Config + behaviour of one PEFT method. Subclasses are dataclasses registered in
    ``PEFT_METHODS``; ``__post_init__`` validates every field so a bad config fails at build."""

    targets: dict | TargetSpec = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    #: regexes of submodules that train fully under any method (as in HF peft): layers the
    #: pretrained checkpoint does not have, e.g. InternViT's simple FPN or output norms
    modules_to_save: list = field(default_factory=list)

    #: adapter layer class, or None for methods that only (un)freeze existing tensors
    layer_cls: ClassVar[type[AdapterLayer] | None] = None
    #: the fields a layer is built from (and that ``overrides`` may change per layer)
    layer_fields: ClassVar[tuple[str, ...]] = ()
    #: whether ``targets`` selects layers at all (Full / Frozen act on the whole module)
    uses_targets: ClassVar[bool] = True
    #: whether the method trains any tensor of the module it adapts (Frozen: no); a comparison
    #: shows such a method as a level, without a parameter count
    trains_module: ClassVar[bool] = True

    # -- how the harness (apis.budget, harness.compare) treats the method ---------------------
    #: the rank field a parameter budget solves for (None: the method's size has no rank)
    budget_rank: ClassVar[str | None] = None
    #: other rank fields the budget solver tries, each with its default candidates (the
    #: solver supports one such field; its value is reported as the solution's second rank)
    budget_rank_choices: ClassVar[dict[str, tuple[int, ...]]] = {}
    #: the row label of a comparison table and plot (default: the registered class name)
    label: ClassVar[str] = 'PEFTMethod'
    #: position of the method's rows in a comparison table (the paper's Table 1 order);
    #: methods without one come after those with one
    table_order: ClassVar[float] = 99
    #: matplotlib colour and marker of the method's series in a comparison plot (a marker of
    #: None: drawn as a level); colour None lets matplotlib choose
    plot_style: ClassVar[tuple[str | None, str | None]] = (None, 'o')

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if 'label' not in cls.__dict__:  # not inherited: a subclass is labelled by its name
            cls.label = cls.__name__

    @classmethod
    def with_budget_ranks(cls, peft: dict, rank: int, **choices: int | None) -> dict:
        """A copy of ``peft`` (a config dict of this method) with ``budget_rank`` set to
        ``rank`` and each of ``budget_rank_choices`` given a value (None: left as it is) set.
        Methods adjust what follows the rank by overriding this (LoRA's alpha)."""
        if cls.budget_rank is None:
            raise PEFTConfigError(f'{cls.__name__} has no rank to fit to a parameter budget')
        unknown = sorted(set(choices) - set(cls.budget_rank_choices))
        if unknown:
            raise PEFTConfigError(f'{cls.__name__}: {unknown} is not a rank the budget sets; '
                                  f'it sets {[cls.budget_rank, *cls.budget_rank_choices]}')
        out = copy.deepcopy(peft)
        out[cls.budget_rank] = int(rank)
        for name, value in choices.items():
            if value is not None:
                out[name] = int(value)
        return out

    @property
    def name(self) -> str:
        return type(self).__name__

    def __post_init__(self) -> None:
        if isinstance(self.targets, dict):
            unknown = set(self.targets) - {f.name for f in fields(TargetSpec)}
            if unknown:
                raise PEFTConfigError(f'targets: unknown key(s) {sorted(unknown)}; '
                                      f'use types, include, exclude')
            self.targets = TargetSpec(**self.targets)
        elif not isinstance(self.targets, TargetSpec):
            raise PEFTConfigError(f'targets must be a dict, got {type(self.targets).__name__}')
        if not isinstance(self.overrides, (list, tuple)):
            raise PEFTConfigError('overrides must be a list of dict(pattern=regex, <field>=...)')
        checked = []
        for ov in self.overrides:
            if not isinstance(ov, dict) or 'pattern' not in ov:
                raise PEFTConfigError(f'each override needs a "pattern" regex, got {ov!r}')
            _check_regex_list(ov['pattern'], 'overrides.pattern')
            bad = set(ov) - {'pattern', *self.layer_fields}
            if bad:
                raise PEFTConfigError(f'override {ov!r}: {self.name} has no per-layer field(s) '
                                      f'{sorted(bad)}; allowed: {list(self.layer_fields)}')
            self.validate_layer_cfg({**self.layer_cfg_defaults(), **ov}, where=f'override {ov!r}')
            checked.append(dict(ov))
        self.overrides = checked
        self.modules_to_save = _check_regex_list(self.modules_to_save, 'modules_to_save')
        self.validate_layer_cfg(self.layer_cfg_defaults(), where=self.name)

    # -- per-layer configuration --------------------------------------------------------------
    def layer_cfg_defaults(self) -> dict:
        return {k: getattr(self, k) for k in self.layer_fields}

    def layer_cfg(self, name: str) -> dict:
        cfg = self.layer_cfg_defaults()
        for ov in self.overrides:  # later overrides win
            if re.search(ov['pattern'], name):
                cfg.update({k: v for k, v in ov.items() if k != 'pattern'})
        return cfg

    def validate_layer_cfg(self, cfg: dict, where: str) -> None:
        """Raise PEFTConfigError for values no layer could use."""
        dropout = cfg.get('dropout', 0.0)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise PEFTConfigError(f'{where}: dropout must be in [0, 1), got {dropout!r}')

    # -- injection ----------------------------------------------------------------------------
    def select(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """Target layers, leaving out those inside ``modules_to_save`` (they train fully)."""
        assert isinstance(self.targets, TargetSpec)
        saved = self.saved_module_names(module)
        return [(n, m) for n, m in module.named_modules()
                if n and not isinstance(m, AdapterLayer) and self.targets.matches(n, m)
                and not any(n == s or n.startswith(s + '.') for s in saved)]

    def saved_module_names(self, module: nn.Module) -> list[str]:
        names = []
        for pattern in self.modules_to_save:
            matched = [n for n, _ in module.named_modules() if n and re.search(pattern, n)]
            if not matched:
                raise PEFTConfigError(f'modules_to_save: {pattern!r} matches no submodule of '
                                      f'{type(module).__name__}')
            names += matched
        return list(dict.fromkeys(names))

    def inject(self, module: nn.Module) -> list[str]:
        """Adapt ``module`` in place and freeze it per the method; returns adapted layer names."""
        state = injection_state(module)
        if state is not None:
            raise PEFTConfigError(
                f'{type(module).__name__} already has {state.method.name} '
                'adapters; inject one method per module')
        self.saved_module_names(module)  # fail before changing anything
        selected = self.select(module) if self.uses_targets else []
        if self.uses_targets and not selected:
            raise PEFTConfigError(
                f'{self.name}: targets {self.targets} match no layer of {type(module).__name__}')
        self.check_overrides_match(module, [n for n, _ in selected])
        layer_names = []
        if self.layer_cls is not None:
            clamps: list[str] = []
            for name, layer in selected:
                adapter = self.build_layer(name, layer, clamps)
                module.set_submodule(name, adapter)
                layer_names.append(name)
            if clamps:
                print_log(f'{self.name}: rank clamped to the mode size in {len(clamps)} layer(s) '
                          f'(e.g. {"; ".join(clamps[:3])})', logger='current')
        else:
            layer_names = [n for n, _ in selected]
        for param in module.parameters():
            param.requires_grad_(False)
        trainable = self.trainable_parameter_names(module, layer_names)
        trainable += [n for n in self.saved_module_parameter_names(module) if n not in trainable]
        params = dict(module.named_parameters())
        for pname in trainable:
            params[pname].requires_grad_(True)
        set_injection_state(module, InjectionState(self, list(trainable)))
        return layer_names

    def check_overrides_match(self, module: nn.Module, names: list[str]) -> None:
        """An override whose pattern matches none of the target layers is a config error
        (a typo there would silently train every layer with the defaults)."""
        for ov in self.overrides:
            if not any(re.search(ov['pattern'], n) for n in names):
                raise PEFTConfigError(
                    f'{self.name}: override pattern {ov["pattern"]!r} matches none of the '
                    f'{len(names)} target layers of {type(module).__name__} (e.g. '
                    f'{names[:3]})')

    def saved_module_parameter_names(self, module: nn.Module) -> list[str]:
        names = []
        for mname in self.saved_module_names(module):
            names += [f'{mname}.{p}' for p, _ in module.get_submodule(mname).named_parameters()]
        return list(dict.fromkeys(names))

    def build_layer(self, name: str, layer: nn.Module, clamps: list[str]) -> AdapterLayer:
        cfg = self.layer_cfg(name)
        assert self.layer_cls is not None
        adapter = self.layer_cls(layer, **cfg)
        for mode, asked, got in adapter.clamped:
            clamps.append(f'{name} mode {mode}: {asked}->{got}')
        return adapter

    def trainable_parameter_names(self, module: nn.Module, layer_names: list[str]) -> list[str]:
        names = []
        for lname in layer_names:
            layer = module.get_submodule(lname)
            names += [f'{lname}.{p}' for p, _ in layer.adapter_parameters()]
        return names

    def to_dict(self) -> dict:
        out = {'type': self.name}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TargetSpec):
                value = dict(types=value.types, include=value.include, exclude=value.exclude)
            out[f.name] = value
        return out


@dataclass
class InjectionState:
    """What ``PEFTMethod.inject`` leaves on the module it adapted: the method, and the names
    (relative to that module) of the tensors it trains."""

    method: PEFTMethod
    trainable: list[str]


def injection_state(module: nn.Module) -> InjectionState | None:
    """The module's :class:`InjectionState`, or None if no method was injected into it."""
    return module.__dict__.get(_STATE_ATTR)


def set_injection_state(module: nn.Module, state: InjectionState | None) -> None:
    """Record (or, with None, forget) an injection; kept out of ``_modules``/``_parameters``
    so it is neither a submodule nor saved in state dicts."""
    if state is None:
        module.__dict__.pop(_STATE_ATTR, None)
    else:
        module.__dict__[_STATE_ATTR] = state


def check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PEFTConfigError(f'{what} must be an integer >= 1, got {value!r}')


def check_bool(cfg: dict, key: str, where: str) -> None:
    """A switch of a method's config must be True or False (a string 'False' is truthy)."""
    if not isinstance(cfg[key], bool):
        raise PEFTConfigError(f'{where}: {key} must be True or False, got {cfg[key]!r}')


def check_number(value: Any, what: str, positive: bool = False) -> None:
    """A finite int or float (NaN and infinities pass ``<`` tests unnoticed), > 0 if asked."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or (positive and value <= 0)):
        raise PEFTConfigError(f'{what} must be a finite number{" > 0" if positive else ""}, '
                              f'got {value!r}')


def kaiming_uniform_(tensor: torch.Tensor) -> None:
    """peft's LoRA-A init (kaiming uniform, a=sqrt(5)) for any 2-D tensor."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
