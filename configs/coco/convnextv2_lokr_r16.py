# LoKr rank 16 on every conv and linear of the backbone: W1 kron W2 with the channel sizes split
# by LyCORIS's factorization (decompose_factor -1, the libraries' default: near the square
# root), W1 whole, W2 rank 16 or whole where that is smaller; peft's default alpha 8
# (scaling 8 / r). The budget leaves set decompose_factor with the rank.
# Methods differ only in model.backbone.peft (docs/recipes.md, docs/compare.md).
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoKr', rank=16, alpha=8, dropout=0.0, decompose_factor=-1,
    decompose_both=False, use_effective_conv2d=False,
    targets=dict(types=['Conv2d', 'Linear']))))
