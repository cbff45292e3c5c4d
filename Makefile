# flora_mm — every target goes through `env`, which builds (once) or reuses the cached
# virtual environment outside the checkout (scripts/setup_env.sh; FLORA_MM_ENV overrides it).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# the environment is shared by every clone: run this checkout's flora_mm, whichever clone the
# editable install last pointed at
PY = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(shell bash scripts/setup_env.sh)

.PHONY: help env python-path test test-dist demo demo-all data bench gpu-check compare wheelhouse \
	env-offline gpu-check-offline host-memory

help:
	@echo "make demo        set up, generate tiny COCO, fine-tune FLoRA with tools/train.py, evaluate with tools/test.py"
	@echo "make demo-all    the same for COCO, ADE20K and DOTA"
	@echo "make test        set up and run the test suite (without the multi-node / slurm launches)"
	@echo "make test-dist   the multi-node (2 torchrun launches) and slurm (fake srun) tests, ~3-4 min"
	@echo "make env         build or reuse the environment only"
	@echo "make bench       time / memory of a training step per PEFT method (docs/performance.md)"
	@echo "make -s python-path   print the environment's interpreter"
	@echo "make gpu-check   on a GPU machine: train/test the tiny configs on CUDA, CUDA tests, 2-GPU run"
	@echo "make host-memory peak host RAM per rank at start / load / save of sharded runs (docs/sharding.md)"
	@echo "make compare     every method on the tiny data of all three tasks (CPU): Table 1 + plot"
	@echo "make wheelhouse  wheels of the whole stack for one target (PYTHON= TORCH= FLORA_MM_CUDA= TORCH_CUDA_ARCH_LIST= WHEELHOUSE=; NODE_PACKAGES= for a layered one)"
	@echo "make env-offline WHEELHOUSE=DIR [PYTHON=...]   install from such a folder, no index (torch already installed)"
	@echo "make gpu-check-offline WHEELHOUSE=DIR [PYTHON=...] [GPU_CHECK_OUT=...]   that install, then gpu-check (one command for a GPU node)"

env:
	@bash scripts/setup_env.sh >/dev/null

python-path:
	@bash scripts/setup_env.sh

# one pytest-xdist worker per core, at most 4 (each holds torch and a task model: ~1-3 GB);
# a file's tests stay on one worker, so module fixtures run once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))

test: env
	$(PY) -m pytest tests -m "not dist" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# tests/test_multinode.py: two "nodes" (two torchrun launches) train, resume and match a one-node
# run; slurm_train.sh / slurm_test.sh under a fake srun (gloo, CPU)
test-dist: env
	$(PY) -m pytest tests/test_multinode.py -m dist $(PYTEST_ARGS)

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

# on a machine with an NVIDIA driver `env` builds the cuda variant by itself (FLORA_MM_CUDA=1 forces it)
gpu-check: env
	$(PY) tools/gpu_check.py

# every method on the tiny COCO / ADE20K / DOTA at one matched budget, on CPU (docs/compare.md);
# its own tiny data (8 train / 4 val images) under COMPARE_DIR, runs two at a time
COMPARE_DIR ?= work_dirs/compare
compare: env
	$(PY) tools/make_tiny_data.py --out $(COMPARE_DIR)/data/tiny --num-train 8 --num-val 4
	$(PY) tools/compare.py configs/coco/tiny/convnextv2_flora_r16.py \
		configs/ade20k/tiny/convnextv2_flora_r16.py configs/dota/tiny/convnextv2_flora_r16.py \
		--methods Frozen Full BitFit LoRA DoRA FLoRA LoCon LoHa LoKr --budgets 2% \
		--max-epochs 6 --max-iters 12 --no-train-val --jobs 2 --dota-iou-thrs 0.5 0.75 \
		--cwd $(COMPARE_DIR) --out $(COMPARE_DIR)

# peak host RSS per rank at start / load / save of sharded runs (docs/sharding.md "Host memory"):
# FLoRA on a ~0.43 B InternViT, Full on a ~0.18 B one (its gathered save holds ~13 bytes per
# parameter on rank 0), 2 gloo processes, one run at a time. After the DCP save is merged:
#   make host-memory HOST_MEMORY_ARGS="--starts meta --save-formats dcp"
# (into the same HOST_MEMORY_DIR: adds the DCP rows to the earlier ones)
HOST_MEMORY_DIR ?= work_dirs/host_memory
HOST_MEMORY_ARGS ?=
host-memory: env
	$(PY) tools/measure_host_memory.py --out $(HOST_MEMORY_DIR) --methods flora $(HOST_MEMORY_ARGS)
	$(PY) tools/measure_host_memory.py --out $(HOST_MEMORY_DIR) --methods full --embed-dim 1024 \
		--depth 12 $(HOST_MEMORY_ARGS)
	$(PY) tools/measure_host_memory.py --project 8 16 > $(HOST_MEMORY_DIR)/projection.md

# offline / cluster install (README "Offline / cluster install"): build the wheels where the index
# is, install them where it is not. Command-line variables reach the scripts as environment.
wheelhouse:
	bash scripts/wheelhouse.sh

env-offline:
	@test -n "$(WHEELHOUSE)" || { echo "usage: make env-offline WHEELHOUSE=DIR [PYTHON=interpreter]"; exit 2; }
	bash scripts/install_offline.sh "$(WHEELHOUSE)" $(PYTHON)

# the offline install, then gpu-check, the report and logs under GPU_CHECK_OUT (a GPU node's first
# run; GPU_CHECK_ARGS=--rehearse-on-cpu rehearses it on a machine without a GPU)
GPU_CHECK_OUT ?= work_dirs/gpu_node_check
gpu-check-offline:
	@test -n "$(WHEELHOUSE)" || { echo "usage: make gpu-check-offline WHEELHOUSE=DIR [PYTHON=interpreter]"; exit 2; }
	bash scripts/gpu_node_check.sh "$(WHEELHOUSE)" "$(or $(PYTHON),python3)" "$(GPU_CHECK_OUT)"
