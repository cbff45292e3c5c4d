"""The command-line tools, as modules of the package: argument parsing and one call into
:mod:`flora_mm.apis` (or :mod:`flora_mm.harness`), so an installed flora_mm runs them without a
checkout. Each module has ``parse_args(argv=None)`` and ``main(argv=None)`` and runs as
``python -m flora_mm.cli.<tool>``; a checkout's ``tools/<tool>.py`` is a thin shell around it.

- ``train``, ``test``: train / test from an mmdet, mmseg or mmrotate config;
- ``merge_adapters``: merge trained adapters into a plain checkpoint;
- ``count_params``: total / trainable parameters, ranks for a budget;
- ``estimate_memory``: per-GPU static memory of a training run;
- ``make_tiny_data``: the tiny COCO / ADE20K / DOTA datasets;
- ``compare``: every method at matched budgets (:mod:`flora_mm.harness.compare`);
- ``benchmark``: step time and memory per method (:mod:`flora_mm.harness.benchmark`);
- ``gpu_check``: the CUDA smoke check (:mod:`flora_mm.harness.gpu_check`; needs a checkout);
- ``demo``: the README demo (runs a checkout's tools/);
- ``_args``: the validators of the numeric options (argparse ``type=`` callables).
"""
