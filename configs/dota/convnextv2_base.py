# the paper's "Base": frozen backbone, neck and heads train.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Frozen')))
