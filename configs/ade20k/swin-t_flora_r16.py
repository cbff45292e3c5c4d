# FLoRA rank 16 (r1 = r2 = 16, kernel rank 2) on every conv and linear of Swin-T, the authors'
# factor init, scale s from the model base. mmseg's Swin UperNet recipe as it is.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/upernet_swin-t_160k_ade20k-512x512_peft.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='FLoRA', rank=16, kernel_rank=2,
    scale={{_base_.flora_scale}}, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
