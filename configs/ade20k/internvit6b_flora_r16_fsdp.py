# FLoRA r16 on InternViT-6B + UperNet, sharded with FSDP2: the frozen bf16 base (12 GB) is split
# across the GPUs with the fp32 adapters beside it in the same blocks (FSDP2 shards each
# parameter on its own, so mixed dtypes and requires_grad per block are fine). Compute keeps the
# unsharded run's dtypes (bf16 base, fp32 adapters), so results match the DDP config.
_base_ = ['./internvit6b_flora_r16.py', '../_base_/fsdp.py']
