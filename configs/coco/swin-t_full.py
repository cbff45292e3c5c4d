# full fine-tuning of Swin-T: mmdet's Swin-T Mask R-CNN 1x recipe as it is.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/mask-rcnn_swin-t-p4-w7_fpn_1x_coco_peft.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Full')))
