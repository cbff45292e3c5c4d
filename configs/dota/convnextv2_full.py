# full fine-tuning of the backbone: the reference recipe as it is.
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Full')))
