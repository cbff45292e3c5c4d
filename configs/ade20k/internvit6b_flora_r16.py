# FLoRA rank 16 (r1 = r2 = 16, kernel rank 2) on every conv and linear of the backbone.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/upernet_internvit-6b_160k_ade20k-504x504.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='FLoRA', rank=16, kernel_rank=2, scale=0.4, dropout=0.0,
        targets=dict(types=['Conv2d', 'Linear']))))
