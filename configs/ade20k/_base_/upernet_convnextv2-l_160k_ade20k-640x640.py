_base_ = [
    './models/upernet_convnextv2-l.py',
    './datasets/ade20k_640x640.py',
    './schedules/adamw_160k.py',
    './default_runtime.py',
]
