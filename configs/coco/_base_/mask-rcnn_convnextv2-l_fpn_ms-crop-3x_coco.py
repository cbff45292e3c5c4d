_base_ = [
    './models/mask-rcnn_convnextv2-l_fpn.py',
    './datasets/coco_instance_ms-crop.py',
    './schedules/adamw_3x.py',
    './default_runtime.py',
]
