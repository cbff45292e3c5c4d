# LoRA rank 16 on every conv of ResNet-50 that trains under Full (convs via the reshaped update,
# paper eq. 3), peft's default alpha 8. Methods differ only in model.backbone.peft.
_base_ = './_base_/oriented-rcnn-le90_r50_fpn_1x_dota_peft.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoRA', rank=16, alpha=8, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear'], exclude={{_base_.peft_exclude}}))))
