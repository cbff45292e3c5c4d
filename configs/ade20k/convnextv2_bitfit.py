# BitFit: biases of the backbone convs/linears train.
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/upernet_convnextv2-l_160k_ade20k-640x640.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='BitFit', targets=dict(types=['Conv2d', 'Linear']))))
