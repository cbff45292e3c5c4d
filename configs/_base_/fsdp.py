# Sharded training with torch FSDP2: add this file to any leaf config's _base_ list, e.g.
#     _base_ = ['./internvit6b_flora_r16.py', '../_base_/fsdp.py']
# (or pass both settings with --cfg-options). It only takes effect in a distributed run
# (tools/dist_train.sh, --launcher pytorch); a single-process run trains unsharded.
# - FullyShardedModel (flora_mm/engine/fsdp.py): one fully_shard unit per block of the backbone,
#   its stem / patch embedding and InternViT's FPN branches, as the backbone's description names
#   them (units=None; a list of regexes overrides it), and one for the backbone's remaining
#   tensors; heads and necks in the root unit.
#   param_dtype=None keeps each parameter's dtype for compute (bf16 frozen base, fp32 adapters);
#   'bfloat16' computes the blocks in bf16 over fp32 master weights (Full fine-tuning).
# - Seed rule (both starts, and one process / DDP through FLoRARunner): tensors no pretrained
#   file fills (adapters, heads, FPN) are initialised per module from a seed derived from the
#   run seed and the module's name, so a seeded run starts from the same weights whatever the
#   strategy (flora_mm/engine/seeded_init.py).
# - FSDPRunner: checkpoints in the format save_format names (below), loaded into the shards
#   from either format on any number of processes; an AmpOptimWrapper becomes a plain
#   OptimWrapper (FSDP does the mixed precision).
runner_type = 'FSDPRunner'
model_wrapper_cfg = dict(
    type='FullyShardedModel',
    units=None,
    activation_checkpointing=False,  # the backbones' own with_cp does it per block
    param_dtype=None,
    reduce_dtype='float32',
    reshard_after_forward=True,
    # the sharded start: parameters built on the meta device, sharded, allocated per shard,
    # pretrained files read on rank 0 and broadcast into the shards (no rank holds the whole
    # model). False: the gathered start (every rank builds and initialises the whole model,
    # rank 0's values are broadcast, then it is sharded); both give the same weights.
    meta_init=True,
    # how checkpoints are written (docs/sharding.md, "Checkpoints and resuming"):
    # 'full': one ordinary mmengine file iter_N.pth; every rank gathers, rank 0 holds the whole
    #   model + optimizer state in host memory and writes it (any tool reads it).
    # 'dcp': a torch.distributed.checkpoint directory iter_N.pth/ (.metadata, one
    #   __R_0.distcp per rank, extra_state.pth); each rank writes its own shards, nothing is
    #   gathered. --resume / load_from / tools/test.py / tools/merge_adapters.py read it on any
    #   number of processes; tools/dcp_to_pth.py writes it as one 'full' file.
    # e.g. --cfg-options model_wrapper_cfg.save_format=dcp
    save_format='full')
