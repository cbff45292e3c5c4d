# full fine-tuning of ResNet-50: mmdet's Mask R-CNN R-50 FPN 1x recipe as it is.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/mask-rcnn_r50_fpn_1x_coco_peft.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Full')))
