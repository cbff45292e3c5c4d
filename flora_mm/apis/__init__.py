"""What the command-line tools compute, as library functions (OpenMMLab's ``mmdet/apis``).

``tools/*.py`` parse arguments and call one function from here:

- ``config``: reading a config (scope registration, --cfg-options, work_dir) and fitting a
  distributed run to a CPU-only machine;
- ``runner``: ``train`` / ``test`` (tools/train.py, tools/test.py) and their options;
- ``model``: the config's model with its PEFT method injected, without a Runner;
- ``merge``: ``merge`` (tools/merge_adapters.py);
- ``count``: ``count_params`` (tools/count_params.py);
- ``memory``: the per-GPU memory planner (tools/estimate_memory.py);
- ``demo``: ``make_tiny_data`` (tools/make_tiny_data.py) and ``run_demo`` (tools/demo.py);
- ``cuda_ops``: whether the installed mmcv carries the detectors' CUDA kernels.

The experiment harnesses that launch the tools (``compare``, ``benchmark``, ``gpu_check``) are
in :mod:`flora_mm.harness`; the tools' argument parsing is in :mod:`flora_mm.cli`.
"""
from .config import (add_runner_args, adapt_to_cpu_distributed, get_scope, load_config,
                     load_runner_config, parse_with_local_rank, replace_sync_bn)
from .count import count_params, format_counts
from .demo import make_tiny_data, run_demo
from .merge import MergeError, merge
from .model import build_model
from .runner import build_runner, test, train

__all__ = [
    'add_runner_args', 'adapt_to_cpu_distributed', 'get_scope', 'load_config',
    'load_runner_config', 'parse_with_local_rank', 'replace_sync_bn', 'count_params',
    'format_counts', 'make_tiny_data', 'run_demo', 'MergeError', 'merge', 'build_model',
    'build_runner', 'test', 'train',
]
