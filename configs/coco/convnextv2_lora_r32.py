# LoRA rank 32 on every conv and linear of the backbone (convs via the reshaped update,
# paper eq. 3), peft's default alpha 8 (scaling 8 / r).
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoRA', rank=32, alpha=8, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
