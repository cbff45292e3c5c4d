# FLoRA rank 16 (r1 = r2 = 16, kernel rank 2) on every conv and linear of the backbone,
# the authors' factor init and their scale s for this backbone (flora_scale in the model base).
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='FLoRA', rank=16, kernel_rank=2,
    scale={{_base_.flora_scale}}, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
