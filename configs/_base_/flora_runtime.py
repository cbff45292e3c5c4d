# flora_mm's hook, merged into every task's default_runtime.py: it logs the parameter table,
# checks the trainable set, writes an adapter-only file beside each checkpoint and logs the
# update's Frobenius norm per stage every `norm_interval` iterations.
custom_hooks = [dict(type='FLoRAHook', norm_interval=50)]
