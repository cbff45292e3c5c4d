# LoRA rank 8 on every conv and linear of the backbone (convs via the reshaped update,
# paper eq. 3), peft's default alpha 8 (scaling 8 / r).
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/upernet_internvit-6b_80k_ade20k-504x504.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoRA', rank=8, alpha=8, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
