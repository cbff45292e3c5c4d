# BitFit: biases of the backbone convs/linears train.
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/upernet_internvit-6b_80k_ade20k-504x504.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='BitFit', targets=dict(types=['Conv2d', 'Linear']))))
