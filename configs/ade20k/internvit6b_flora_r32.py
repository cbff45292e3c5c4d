# FLoRA rank 32 (r1 = r2 = 32, kernel rank 2) on every conv and linear of the backbone,
# the authors' factor init and their scale s for this backbone (flora_scale in the model base).
# Methods differ only in model.backbone.peft (docs/recipes.md).
_base_ = './_base_/upernet_internvit-6b_80k_ade20k-504x504.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='FLoRA', rank=32, kernel_rank=2,
    scale={{_base_.flora_scale}}, dropout=0.0,
    targets=dict(types=['Conv2d', 'Linear']))))
