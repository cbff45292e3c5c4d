"""Experiment harnesses: they run the tools (and measure) rather than compute a model's figures.

- ``compare``: every PEFT method at matched budgets, each trained and tested in its own
  subprocess (``python -m flora_mm.cli.train`` / ``flora_mm.cli.test``; tools/compare.py);
- ``benchmark``: time, arithmetic and peak memory of a training step per method
  (tools/benchmark.py, ``make bench``);
- ``gpu_check``: the tiny configs trained and tested on CUDA, the CUDA tests, a 2-GPU run
  (tools/gpu_check.py, ``make gpu-check``);
- ``launch``: the command lines (``python -m flora_mm.cli.<tool>``, torchrun as
  tools/dist_*.sh) and environment those subprocesses start with.

What the tools compute (configs, runners, counts, budgets, merging, memory plans) stays in
:mod:`flora_mm.apis`. Import the submodules directly (``from flora_mm.harness import compare``);
this package imports nothing heavy by itself.
"""
