# Full fine-tuning of InternViT-6B + UperNet, sharded with FSDP2 (paper Table 2, "Full").
# Why sharded: AdamW on 6.37e9 trainable parameters with fp32 master weights needs 16 bytes per
# parameter (weights 4 + gradients 4 + two moments 8), ~95 GiB per GPU under DDP before any
# activation: more than an 80 GB GPU. FSDP on 8 GPUs holds 1/8 of that per GPU
# (tools/estimate_memory.py; docs/sharding.md). The backbone is stored in fp32 (master weights:
# bf16 weights would round away AdamW's small updates) and computes in bf16 under FSDP.
_base_ = ['./internvit6b_full.py', '../_base_/fsdp.py']
model = dict(backbone=dict(backbone=dict(dtype='float32')))
model_wrapper_cfg = dict(param_dtype='bfloat16')
