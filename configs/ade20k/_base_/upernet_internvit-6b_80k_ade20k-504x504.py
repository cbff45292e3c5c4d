_base_ = [
    './models/upernet_internvit-6b.py',
    './datasets/ade20k_504x504.py',
    './schedules/adamw_80k_bf16.py',
    './default_runtime.py',
]
