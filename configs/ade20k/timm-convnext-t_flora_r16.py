# FLoRA rank 16 (r1 = r2 = 16, kernel rank 2) on every conv and linear of timm's convnext_tiny
# (stem, downsamples, depthwise 7x7 convs, MLPs) under UperNet, the authors' factor init, scale
# s from the model base. Another method: replace model.backbone.peft only.
_base_ = './_base_/upernet_timm-convnext-t_160k_ade20k-512x512_peft.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='FLoRA', rank=16, kernel_rank=2,
    scale={{_base_.flora_scale}}, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
