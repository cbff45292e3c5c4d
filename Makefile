# flora_mm — every target goes through `env`, which builds (once) or reuses the cached
# virtual environment outside the checkout (scripts/setup_env.sh; FLORA_MM_ENV overrides it).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# the environment is shared by every clone: run this checkout's flora_mm, whichever clone the
# editable install last pointed at
PY = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(shell bash scripts/setup_env.sh)

.PHONY: help env python-path test demo demo-all data bench

help:
	@echo "make demo        set up, generate tiny COCO, fine-tune FLoRA with tools/train.py, evaluate with tools/test.py"
	@echo "make demo-all    the same for COCO, ADE20K and DOTA"
	@echo "make test        set up and run the test suite"
	@echo "make env         build or reuse the environment only"
	@echo "make bench       time / memory of a training step per PEFT method (docs/performance.md)"
	@echo "make -s python-path   print the environment's interpreter"

env:
	@bash scripts/setup_env.sh >/dev/null

python-path:
	@bash scripts/setup_env.sh

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: env
	$(PY) tools/demo.py --tasks coco

demo-all: env
	$(PY) tools/demo.py --tasks coco ade20k dota

# the run quoted in docs/performance.md; e.g. make bench BENCH_ARGS="--rounds 3 --no-memory"
BENCH_ARGS ?= --arch tiny --batch 8 --size 224 --rounds 6
bench: env
	@mkdir -p work_dirs/benchmark
	$(PY) tools/benchmark.py $(BENCH_ARGS) --json work_dirs/benchmark/benchmark.json \
		--plot work_dirs/benchmark/benchmark.png
