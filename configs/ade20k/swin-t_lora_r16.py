# LoRA rank 16 on every conv and linear of Swin-T, peft's default alpha 8.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/upernet_swin-t_160k_ade20k-512x512_peft.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoRA', rank=16, alpha=8, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
