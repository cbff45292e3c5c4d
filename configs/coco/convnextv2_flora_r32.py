# FLoRA rank 32 (r1 = r2 = 32, kernel rank 2) on every conv and linear of the backbone.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='FLoRA', rank=32, kernel_rank=2, scale=4.0, dropout=0.0,
        targets=dict(types=['Conv2d', 'Linear']))))
