"""Count total and trainable parameters of a config's model (the paper's "# Params").

    python tools/count_params.py CONFIG [--cfg-options k=v ...] [--json]

The model is built on the meta device with PEFTBackbone's ``load_pretrained=False``: no tensor
memory and no checkpoint file, so ConvNeXt-V2-L and InternViT-6B configs take seconds. Prints
total / trainable per top-level part (backbone with its PEFT method, neck, heads) and the
backbone's adapter bookkeeping; ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import _peft_model as pm
from mmengine.config import Config, DictAction
from mmengine.logging import MMLogger

from flora_mm.engine.flora_hook import format_table, parameter_table
from flora_mm.peft import count_parameters, injected_roots


def count_params(config: str | Config, cfg_options: Optional[dict] = None) -> dict:
    """Parameter counts of ``config``'s model (a path or a loaded Config): per part, overall,
    and per PEFT method.

    ``per_method[name]`` has the method's trainable tensors (``trainable``), the tensors it
    added to the plain model (``added``) and the number of adapted ``layers``, summed over
    every module the method was injected into.
    """
    cfg = pm.load_tool_config(config, cfg_options)
    model = pm.build_model(cfg, load_pretrained=False, meta=True)
    rows = parameter_table(model)
    per_method: dict[str, dict[str, int]] = {}
    for name, module, _ in injected_roots(model):
        for method, entry in count_parameters(module)['per_method'].items():
            acc = per_method.setdefault(method, dict(trainable=0, added=0, layers=0))
            for key in acc:
                acc[key] += entry[key]
    return dict(
        config=config if isinstance(config, str) else (config.filename or '<Config>'),
        parts=[dict(part=p, method=m, total=t, trainable=tr) for p, m, t, tr in rows],
        total=sum(r[2] for r in rows),
        trainable=sum(r[3] for r in rows),
        per_method=per_method,
    )


def format_counts(counts: dict) -> str:
    """The FLoRAHook table plus one line per PEFT method."""
    rows = [(r['part'], r['method'], r['total'], r['trainable']) for r in counts['parts']]
    lines = [counts['config'], format_table(rows)]
    for method, entry in counts['per_method'].items():
        lines.append(f'{method}: {entry["layers"]} adapted layers, {entry["trainable"]:,} '
                     f'trainable method tensors, {entry["added"]:,} added to the plain model')
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file path')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs (as train.py)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    return parser.parse_args(argv)


def logs_to_stderr() -> None:
    """mmengine logs to stdout; keep stdout for the table / JSON so it can be piped."""
    for handler in MMLogger.get_current_instance().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logs_to_stderr()
    counts = count_params(args.config, args.cfg_options)
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))


if __name__ == '__main__':
    main()
