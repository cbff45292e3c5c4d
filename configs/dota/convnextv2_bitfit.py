# BitFit: biases of the backbone convs/linears train.
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='BitFit', targets=dict(types=['Conv2d', 'Linear']))))
