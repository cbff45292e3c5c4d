"""Validators for the tools' numeric options, as argparse ``type=`` callables.

A value out of range, not finite (``nan``, ``inf``, ``1e400``, which ``float()`` reads as inf)
or not a number at all is refused while parsing, the way argparse refuses a bad choice: exit
status 2 and ``<tool>: error: argument --jobs: must be an integer >= 1, got '0'``, instead of a
traceback (or a silent misbehaviour) deep inside a run.

    parser.add_argument('--jobs', type=positive_int, default=1)
    parser.add_argument('--device-gib', type=finite_float(gt=0), default=80.0)
    parser.add_argument('--budget', type=budget)
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

#: the largest count an int option takes by default: a C int, what torch and the OS take for
#: threads, processes and sizes (an iteration count beyond it is a typo, not a schedule)
INT_MAX = 2 ** 31 - 1


def _num(value: float) -> str:
    return f'{value:g}' if isinstance(value, float) else str(value)


def int_range(lo: Optional[int] = None, hi: Optional[int] = INT_MAX,
              name: Optional[str] = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either end open with None); the message names the bound
    broken (``must be an integer >= 1, got '0'``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (lo is not None and value < lo):
            bound = f' >= {lo}' if lo is not None else ''
            raise argparse.ArgumentTypeError(f'must be an integer{bound}, got {text!r}')
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f'must be an integer <= {hi}, got {text!r}')
        return value

    parse.__name__ = name or f'int_range({lo}, {hi})'
    return parse


positive_int = int_range(1, name='positive_int')
nonnegative_int = int_range(0, name='nonnegative_int')
port = int_range(1, 65535, name='port')


def finite_float(gt: Optional[float] = None, ge: Optional[float] = None,
                 le: Optional[float] = None, name: Optional[str] = None) -> Callable[[str], float]:
    """A finite float (no nan / inf / overflow to inf), optionally > ``gt``, >= ``ge``,
    <= ``le``."""
    bounds = [f'{op} {_num(v)}' for op, v in (('>', gt), ('>=', ge), ('<=', le))
              if v is not None]
    what = ' '.join(['a finite number', ' and '.join(bounds)]).rstrip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}') from None
        if not math.isfinite(value) or (gt is not None and not value > gt) or \
                (ge is not None and not value >= ge) or (le is not None and not value <= le):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text!r}')
        return value

    parse.__name__ = name or 'finite_float'
    return parse


def budget(text: str) -> str:
    """A parameter budget ``flora_mm.apis.budget.parse_budget`` reads (12.9M, 500K, 0.66%):
    positive, finite, a share at most 100%. Returns the text unchanged."""
    from ..apis.budget import BudgetError, parse_budget  # noqa: PLC0415  (mmengine)
    try:
        parse_budget(text)
    except BudgetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


__all__ = ['INT_MAX', 'int_range', 'positive_int', 'nonnegative_int', 'port', 'finite_float',
           'budget']


def add_cfg_options(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options k=v ...`` of the tools that read a config without running it."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs (as train.py)')
