# FLoRA rank 8 (r1 = r2 = 8, kernel rank 2) on every conv and linear of the backbone.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='FLoRA', rank=8, kernel_rank=2, scale=4.0, dropout=0.0,
        targets=dict(types=['Conv2d', 'Linear']))))
