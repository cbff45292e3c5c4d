_base_ = 'mmseg::_base_/default_runtime.py'
custom_hooks = [dict(type='FLoRAHook', norm_interval=50)]
