# Full fine-tuning of InternViT-6B + UperNet, sharded with FSDP2 (paper Table 2, "Full").
# Why sharded: AdamW on 6.37e9 trainable parameters with fp32 master weights needs 16 bytes per
# parameter (weights 4 + gradients 4 + two moments 8), ~95 GiB per GPU under DDP before any
# activation (~118 GiB with DDP's gradient buckets): more than an 80 GB GPU on any number of
# GPUs. FSDP on 8 GPUs holds 1/8 of it per GPU (tools/estimate_memory.py; docs/sharding.md).
# The weights stay fp32 (master weights) and the blocks compute in bf16 under FSDP, as the
# unsharded recipe does with bf16 autocast.
_base_ = ['./internvit6b_full.py', '../_base_/fsdp.py']
model_wrapper_cfg = dict(param_dtype='bfloat16')
