# LoHa rank 16 on every conv and linear of the backbone: the Hadamard product of two rank-16
# updates of the flattened weight (peft's default, use_effective_conv2d=False); peft's default
# alpha 8 (scaling 8 / r).
# Methods differ only in model.backbone.peft (docs/recipes.md, docs/compare.md).
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoHa', rank=16, alpha=8, dropout=0.0, use_effective_conv2d=False,
    targets=dict(types=['Conv2d', 'Linear']))))
