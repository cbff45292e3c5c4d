# LoRA rank 16 on every conv and linear of the backbone (convs via the reshaped update,
# paper eq. 3), peft's default alpha 8 (scaling 8 / r).
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoRA', rank=16, alpha=8, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
