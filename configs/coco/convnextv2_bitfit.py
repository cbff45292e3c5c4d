# BitFit: biases of the backbone convs/linears train.
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='BitFit', targets=dict(types=['Conv2d', 'Linear']))))
