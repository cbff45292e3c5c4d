"""Total and trainable parameters of a config's model (the paper's "# Params").

The model is built on the meta device with PEFTBackbone's ``load_pretrained=False``: no tensor
memory and no checkpoint file, so ConvNeXt-V2-L and InternViT-6B configs take seconds.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from mmengine.config import Config
from mmengine.logging import MMLogger

from ..peft import count_parameters, format_table, parameter_table
from .config import load_config
from .model import build_model


def count_params(config: str | Config, cfg_options: Optional[dict] = None) -> dict:
    """Parameter counts of ``config``'s model (a path or a loaded Config): per part, overall,
    and per PEFT method.

    ``per_method[name]`` has the method's trainable tensors (``trainable``), the tensors it
    added to the plain model (``added``) and the number of adapted ``layers``, summed over
    every module the method was injected into.
    """
    cfg = load_config(config, cfg_options)
    model = build_model(cfg, load_pretrained=False, meta=True)
    rows = parameter_table(model)
    return dict(
        config=config if isinstance(config, str) else (config.filename or '<Config>'),
        parts=[dict(part=p, method=m, total=t, trainable=tr) for p, m, t, tr in rows],
        total=sum(r[2] for r in rows),
        trainable=sum(r[3] for r in rows),
        per_method=count_parameters(model)['per_method'],
    )


def format_counts(counts: dict) -> str:
    """The FLoRAHook table plus one line per PEFT method."""
    rows = [(r['part'], r['method'], r['total'], r['trainable']) for r in counts['parts']]
    lines = [counts['config'], format_table(rows)]
    for method, entry in counts['per_method'].items():
        lines.append(f'{method}: {entry["layers"]} adapted layers, {entry["trainable"]:,} '
                     f'trainable method tensors, {entry["added"]:,} added to the plain model')
    return '\n'.join(lines)


def logs_to_stderr() -> None:
    """mmengine logs to stdout; keep stdout for a table / JSON that can be piped."""
    for handler in MMLogger.get_current_instance().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
