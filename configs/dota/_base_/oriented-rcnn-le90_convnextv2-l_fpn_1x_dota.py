_base_ = [
    './models/oriented-rcnn-le90_convnextv2-l_fpn.py',
    './datasets/dota.py',
    './schedules/adamw_1x.py',
    './default_runtime.py',
]
