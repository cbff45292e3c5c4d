_base_ = 'mmdet::_base_/default_runtime.py'
# logs the parameter table, checks the trainable set, writes adapter-only checkpoints next to
# each regular one and logs the update's Frobenius norm per stage
custom_hooks = [dict(type='FLoRAHook', norm_interval=50)]
