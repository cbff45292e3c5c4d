# FLoRA rank 16 (r1 = r2 = 16, kernel rank 2) on every conv of ResNet-50 that trains under Full
# (stem and stage 1 stay frozen as in the recipe), the authors' factor init, scale s from the
# model base. mmdet's SGD recipe as it is. Methods differ only in model.backbone.peft.
_base_ = './_base_/mask-rcnn_r50_fpn_1x_coco_peft.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='FLoRA', rank=16, kernel_rank=2,
    scale={{_base_.flora_scale}}, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear'], exclude={{_base_.peft_exclude}}))))
