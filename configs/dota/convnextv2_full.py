# full fine-tuning of the backbone.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Full')))
