"""Parameter budgets: the rank (and FLoRA's kernel rank) that matches a budget like the paper's.

Which field a budget solves, and which other ranks it tries, each method declares itself
(``PEFTMethod.budget_rank``, ``budget_rank_choices``, ``with_budget_ranks``): LoRA, DoRA and FLoRA
solve ``rank``, FLoRA tries kernel ranks 1 and 2 as well; a method registered elsewhere with a
``budget_rank`` is solved the same way.

Why: the paper compares methods at matched budgets (Table 1: about 12.9M / 25.9M / 51.8M on
ConvNeXt-V2-L; Table 2: 0.32% / 0.66% of InternViT-6B), and the count of an adapter depends on
every targeted layer's shape, groups and kernel, on rank clamping and on per-layer overrides.
So the counts come from the real adapted backbone, built on the meta device (no memory, no
checkpoint read), never from a formula that could drift from the layers.

What is counted (``method_params``): the backbone tensors the PEFT method itself trains, i.e.
the method's trainable tensors less the ``modules_to_save`` that train under every method
(ConvNeXt-V2's output norms, InternViT's simple FPN). For LoRA, DoRA and FLoRA that is exactly
the adapter tensors they add; for BitFit the biases; for Full the pretrained backbone; for
Frozen ("Base") nothing. A relative budget (``0.66%``) is a share of the pretrained backbone
(``backbone_params``: the plain backbone less ``modules_to_save``), so Full is 100%.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from torch import nn

from ..checkpoint import to_plain
from ..peft import (PEFTConfigError, PEFTMethod, build_peft_method, count_parameters,
                    injected_roots, remove_adapters)
from ..models.meta import meta_device
from ..models.peft_backbone import with_saved_modules, without_weights
from ..registry import MODELS, PEFT_METHODS
from .config import get_scope, load_config

#: the solver stops doubling the rank here (LoRA's count grows without bound)
DEFAULT_MAX_RANK = 4096


def registered_methods() -> list[type[PEFTMethod]]:
    """Every registered method class once (aliases such as 'Base' left out), in table order
    (``PEFTMethod.table_order``, then registration order)."""
    classes = list(dict.fromkeys(PEFT_METHODS.module_dict.values()))
    return sorted(classes, key=lambda cls: cls.table_order)


def rank_methods() -> tuple[str, ...]:
    """Names of the registered methods whose size follows a rank (``budget_rank``)."""
    return tuple(cls.__name__ for cls in registered_methods() if cls.budget_rank is not None)


def __getattr__(name: str):
    # RANK_METHODS: the methods a budget can be solved for, read from the registry when asked
    # (a method registered after this module was imported is included); DEFAULT_KERNEL_RANKS:
    # the kernel ranks tried by default, as the method with a kernel rank declares them
    if name == 'RANK_METHODS':
        return rank_methods()
    if name == 'DEFAULT_KERNEL_RANKS':
        for cls in registered_methods():
            if 'kernel_rank' in cls.budget_rank_choices:
                return tuple(cls.budget_rank_choices['kernel_rank'])
        return ()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def second_rank(cls: type[PEFTMethod]) -> tuple[Optional[str], tuple[int, ...]]:
    """The one rank besides ``budget_rank`` that the solver tries (name, default candidates),
    or (None, ())."""
    choices = cls.budget_rank_choices
    if len(choices) > 1:
        raise BudgetError(f'{cls.__name__}: the solver tries one rank besides '
                          f'{cls.budget_rank!r}, the method declares {sorted(choices)}')
    return next(iter(choices.items()), (None, ()))


_SUFFIX = {'': 1.0, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'B': 1e9}
_BUDGET_RE = re.compile(r'^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGbB%]?)\s*$')


class BudgetError(ValueError):
    """A budget or config the solver cannot work with; the message says which and why."""


@dataclass(frozen=True)
class Budget:
    """An absolute parameter count (``12.9M``) or a share of the backbone (``0.66%``)."""

    text: str
    value: float
    relative: bool

    def target(self, backbone_params: int) -> float:
        """The budget in parameters for a backbone of ``backbone_params`` parameters."""
        return self.value / 100.0 * backbone_params if self.relative else self.value


def parse_budget(budget: str | int | float | Budget) -> Budget:
    """``'12.9M'``, ``'500k'``, ``'1.2G'``, ``'12900000'``, ``12.9e6`` or ``'0.66%'``."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not 0 < budget <= sys.float_info.max:  # also nan, inf and ints past a float
            raise BudgetError(f'budget must be a finite number > 0, got {budget!r}')
        return Budget(text=format_count(budget), value=float(budget), relative=False)
    if not isinstance(budget, str):
        raise BudgetError(f'budget must be a string like 12.9M or 0.66%, got {budget!r}')
    match = _BUDGET_RE.match(budget)
    if match is None:
        raise BudgetError(f'cannot read budget {budget!r}: use a count with an optional K/M/G '
                          'suffix (12.9M, 500K, 1200000) or a share of the backbone (0.66%)')
    number, suffix = float(match.group(1)), match.group(2).upper()
    if number <= 0:
        raise BudgetError(f'budget must be > 0, got {budget!r}')
    if not math.isfinite(number * _SUFFIX[suffix.rstrip('%')]):  # '1e400' reads as inf
        raise BudgetError(f'budget must be a finite number, got {budget!r}')
    if suffix == '%':
        if number > 100:
            raise BudgetError(f'a relative budget is at most 100% of the backbone, got {budget!r}')
        return Budget(text=budget.strip(), value=number, relative=True)
    return Budget(text=budget.strip(), value=number * _SUFFIX[suffix], relative=False)


def format_count(n: float) -> str:
    """12940000 -> '12.94M' (the paper's style), 6.05e9 -> '6.05B', 5760 -> '5.8K'."""
    if n >= 1e9:
        return f'{n / 1e9:.2f}B'
    if n >= 1e5:
        return f'{n / 1e6:.2f}M'
    if n >= 1e3:
        return f'{n / 1e3:.1f}K'
    return str(int(n))


# ----------------------------------------------------------------------------- counting
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFTBackbone logs one line per build: keep the search's dozens of builds silent."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(config: str | Config, cfg_options: Optional[dict] = None) -> Config:
    cfg = load_config(config, cfg_options)
    backbone = cfg.get('model', {}).get('backbone', None)
    if not isinstance(backbone, dict) or backbone.get('type') != 'PEFTBackbone':
        raise BudgetError(
            f'{getattr(cfg, "filename", None) or "config"}: model.backbone must be a '
            "PEFTBackbone (dict(type='PEFTBackbone', backbone=..., peft=...)) to count or solve "
            'budgets')
    init_default_scope(get_scope(cfg))
    return cfg


def base_peft(config: str | Config) -> dict:
    """The config's ``model.backbone.peft`` as a plain dict."""
    cfg = _load(config)
    return to_plain(cfg.model.backbone.peft)


def build_backbone_meta(cfg: Config, peft: Optional[dict] = None) -> nn.Module:
    """The config's PEFTBackbone on the meta device, with ``peft`` in place of the config's."""
    backbone = to_plain(cfg.model.backbone)
    backbone['load_pretrained'] = False
    if peft is not None:
        backbone['peft'] = to_plain(peft)
    with _quiet(), meta_device():
        return MODELS.build(backbone)


def backbone_counts(module: nn.Module) -> dict:
    """Counts of an adapted backbone (see the module docstring for what each one means)."""
    roots = list(injected_roots(module))
    if len(roots) != 1:
        raise BudgetError(f'expected one PEFT method in the backbone, found {len(roots)}')
    name, root, method = roots[0]
    entry = count_parameters(root)['per_method'][method.name]
    saved_names = set(method.saved_module_parameter_names(root))
    params = dict(root.named_parameters())
    saved = sum(params[n].numel() for n in saved_names)
    total = sum(p.numel() for p in module.parameters())
    return dict(method=method.name, method_params=entry['trainable'] - saved,
                trainable=entry['trainable'], added=entry['added'], layers=entry['layers'],
                saved=saved, total=total, backbone_params=total - entry['added'] - saved)


def count_backbone(config: str | Config, peft: Optional[dict] = None) -> dict:
    """``backbone_counts`` of the config's backbone (with ``peft`` if given), on the meta device."""
    cfg = _load(config)
    return backbone_counts(build_backbone_meta(cfg, peft))


# ----------------------------------------------------------------------------- solving
def method_peft(method: str, base: dict) -> dict:
    """A ``peft`` dict for ``method`` that keeps what ``base`` (the config's) says about it.

    Same type: the base dict itself. Another type: the base's ``targets`` and
    ``modules_to_save`` carry over (what to adapt is a property of the experiment); the method's
    own fields take its defaults.
    """
    cls = PEFT_METHODS.get(method)
    if cls is None:
        raise BudgetError(f'unknown PEFT method {method!r}; registered: '
                          f'{sorted(PEFT_METHODS.module_dict)}')
    base_type = PEFT_METHODS.get(base.get('type', ''))
    if base_type is cls:
        return dict(copy.deepcopy(base), type=method)
    out = dict(type=method)
    for key in ('modules_to_save', *(('targets',) if cls.uses_targets else ())):
        if key in base:
            out[key] = copy.deepcopy(base[key])
    return out


def with_rank(peft: dict, rank: int, kernel_rank: Optional[int] = None) -> dict:
    """``peft`` with its rank fields set, as its method sets them (``with_budget_ranks``: e.g.
    LoRA/DoRA ``alpha`` follows the rank when it equalled it, scaling 1 as in every config
    here; any other alpha is the user's choice and stays). ``kernel_rank`` is the value of the
    method's second budget rank (FLoRA's ``kernel_rank``); methods without one ignore it."""
    cls = PEFT_METHODS.get(peft['type'])
    if cls.budget_rank is None:
        raise BudgetError(f'{cls.__name__} has no rank: only {rank_methods()} can be fitted to '
                          'a budget')
    second, _ = second_rank(cls)
    choices = {second: kernel_rank} if second is not None else {}
    try:
        return cls.with_budget_ranks(peft, rank, **choices)
    except PEFTConfigError as err:
        raise BudgetError(str(err)) from err


@dataclass
class Solution:
    """The rank (and kernel rank) whose count is closest to the budget."""

    method: str
    budget: str
    target: float
    rank: int
    kernel_rank: Optional[int]
    count: int
    backbone_params: int
    peft: dict = field(repr=False)
    #: count at rank - 1 and rank + 1 (same kernel rank): the step the budget falls between
    neighbours: tuple = ()
    reachable: bool = True

    @property
    def rel_error(self) -> float:
        return (self.count - self.target) / self.target

    @property
    def share(self) -> float:
        return self.count / self.backbone_params

    def as_dict(self) -> dict:
        return dict(asdict(self), rel_error=self.rel_error, share=self.share)


def _closest_rank(count: Callable[[int], int], target: float,
                  max_rank: int) -> tuple[int, bool]:
    """Rank in [1, max_rank] whose count is closest to ``target`` (ties: the smaller rank),
    for a count that does not decrease with the rank; and whether the target was reachable.

    Counts are nearly linear in the rank (LoRA exactly, FLoRA plus a small r^2 term), so the
    next rank to try is interpolated from the last two; each guess is then confirmed by its
    neighbour, which keeps the number of model builds to a handful.
    """
    if count(1) >= target:
        return 1, True
    prev, lo = None, 1  # invariant: count(lo) < target
    while True:  # grow until count(hi) >= target
        if prev is None or count(lo) == count(prev):
            nxt = 2 * lo
        else:
            slope = (count(lo) - count(prev)) / (lo - prev)
            nxt = lo + math.ceil((target - count(lo)) / slope)
        nxt = min(max(nxt, lo + 1), max_rank)
        if count(nxt) >= target:
            hi = nxt
            break
        if nxt == max_rank:
            return max_rank, False  # the largest rank allowed is still below the budget
        if count(nxt) == count(lo):
            # no layer grew from lo to nxt: every channel mode is clamped, the count saturated
            return lo, False
        prev, lo = lo, nxt
    while hi - lo > 1:  # count(lo) < target <= count(hi)
        c_lo, c_hi = count(lo), count(hi)
        guess = lo + round((target - c_lo) * (hi - lo) / (c_hi - c_lo))
        guess = min(max(guess, lo + 1), hi - 1)
        if count(guess) < target:
            lo = guess
            if count(guess + 1) >= target:
                hi = guess + 1
        else:
            hi = guess
            if count(guess - 1) < target:
                lo = guess - 1
    return (lo, True) if target - count(lo) <= count(hi) - target else (hi, True)


class _MetaBackbone:
    """The config's plain backbone, built once on the meta device; each count injects a method
    and removes it again (one injection costs less than building InternViT-6B again)."""

    def __init__(self, cfg: Config) -> None:
        backbone = to_plain(cfg.model.backbone)
        self.saved = backbone.get('modules_to_save')
        with _quiet(), meta_device():
            self.module = MODELS.build(without_weights(backbone['backbone']))

    def counts(self, peft: dict) -> dict:
        # as PEFTBackbone adds the backbone's new modules to the method's modules_to_save
        peft = with_saved_modules(peft, self.module, self.saved)
        try:
            with _quiet():  # adapter tensors follow the (meta) weights they adapt
                build_peft_method(peft).inject(self.module)
            return backbone_counts(self.module)
        finally:
            remove_adapters(self.module, merge=False)


def solve_rank(config: str | Config, budget: str | float | Budget,
               method: Optional[str] = None,
               kernel_ranks: Optional[Sequence[int]] = None,
               max_rank: int = DEFAULT_MAX_RANK,
               cfg_options: Optional[dict] = None) -> Solution:
    """The rank for ``method`` (default: the config's own) whose ``method_params`` on the
    config's backbone is closest to ``budget``.

    A method with a second budget rank (FLoRA's kernel rank): every value in ``kernel_ranks``
    (default: the method's ``budget_rank_choices``, for FLoRA the paper's 1 and 2) is tried
    with its best rank and the closest pair wins (ties: the config's own value, then the
    smaller). Every count comes from the real adapted backbone on the meta device, and the
    answer is re-counted through ``PEFTBackbone`` itself, as training builds it.
    """
    cfg = _load(config, cfg_options)
    budget = parse_budget(budget)
    base = to_plain(cfg.model.backbone.peft)
    method = method or PEFT_METHODS.get(base['type']).__name__
    if PEFT_METHODS.get(method) is None:
        raise BudgetError(f'unknown PEFT method {method!r}; registered: '
                          f'{sorted(PEFT_METHODS.module_dict)}')
    cls = PEFT_METHODS.get(method)
    kind = cls.__name__
    if cls.budget_rank is None:
        raise BudgetError(f'{method} has no rank: only {rank_methods()} can be fitted to a '
                          'budget')
    peft = method_peft(kind, base)
    smallest = with_rank(peft, 1)  # fails early on a config the method cannot solve
    backbone = _MetaBackbone(cfg)
    # the pretrained backbone less modules_to_save: the same whatever is injected
    backbone_params = backbone.counts(smallest)['backbone_params']
    target = budget.target(backbone_params)

    cache: dict[tuple, int] = {}

    def counter(kernel_rank: Optional[int]) -> Callable[[int], int]:
        def count(rank: int) -> int:
            key = (rank, kernel_rank)
            if key not in cache:
                cache[key] = backbone.counts(with_rank(peft, rank, kernel_rank))['method_params']
            return cache[key]
        return count

    second, defaults = second_rank(cls)
    if second is not None:
        own = peft.get(second, getattr(cls, second))
        candidates = sorted(set(kernel_ranks or defaults))
        if not candidates or any(not isinstance(k, int) or k < 1 for k in candidates):
            raise BudgetError(f'kernel ranks must be integers >= 1, got {kernel_ranks!r}')
    else:
        own, candidates = None, [None]
    best = None
    for kernel_rank in candidates:
        count = counter(kernel_rank)
        rank, reachable = _closest_rank(count, target, max_rank)
        key = (abs(count(rank) - target), kernel_rank != own, kernel_rank or 0)
        if best is None or key < best[0]:
            best = (key, rank, kernel_rank, reachable)
    _, rank, kernel_rank, reachable = best
    count = counter(kernel_rank)
    chosen = with_rank(peft, rank, kernel_rank)
    built = backbone_counts(build_backbone_meta(cfg, chosen))['method_params']
    if built != count(rank):
        raise RuntimeError(f'{kind} rank {rank}: {count(rank)} parameters by injection, {built} '
                           'through PEFTBackbone; the two paths disagree')
    neighbours = tuple(count(r) for r in (rank - 1, rank + 1) if 1 <= r <= max_rank)
    return Solution(method=kind, budget=budget.text, target=target, rank=rank,
                    kernel_rank=kernel_rank, count=built, backbone_params=backbone_params,
                    peft=chosen, neighbours=neighbours, reachable=reachable)


def solve_all(config: str | Config, budget: str | float | Budget,
              methods: Optional[Sequence[str]] = None, cfg_options: Optional[dict] = None,
              **kwargs) -> list[Solution]:
    """``solve_rank`` for every method in ``methods`` (default: ``rank_methods()``; the config
    is read once)."""
    cfg = _load(config, cfg_options)
    return [solve_rank(cfg, budget, method=m, **kwargs) for m in methods or rank_methods()]


def format_solutions(solutions: Sequence[Solution]) -> str:
    """One line per method: the chosen ranks and how close the count lands."""
    lines = []
    for s in solutions:
        cls = PEFT_METHODS.get(s.method)
        ranks = f'{cls.budget_rank}={s.rank}' + (
            f', {second_rank(cls)[0]}={s.kernel_rank}' if s.kernel_rank is not None else '')
        note = '' if s.reachable else '  (budget out of reach: largest count shown)'
        lines.append(f'{s.method:<6} {ranks:<26} {s.count:>14,} params '
                     f'({100 * s.share:.3f}% of {s.backbone_params:,}; budget {s.budget} = '
                     f'{s.target:,.0f}, {100 * s.rel_error:+.2f}%){note}')
    return '\n'.join(lines)


def closest_possible(solution: Solution) -> bool:
    """Whether no neighbouring rank lands closer to the target (a self-check for callers)."""
    return all(abs(solution.count - solution.target) <= abs(n - solution.target)
               for n in solution.neighbours)


__all__ = ['Budget', 'BudgetError', 'Solution', 'parse_budget', 'format_count', 'base_peft',
           'to_plain',
           'build_backbone_meta', 'backbone_counts', 'count_backbone', 'method_peft',
           'with_rank', 'solve_rank', 'solve_all', 'format_solutions', 'closest_possible',
           'registered_methods', 'rank_methods', 'second_rank', 'RANK_METHODS',
           'DEFAULT_KERNEL_RANKS']
