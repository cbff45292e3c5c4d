# LoCon (LyCORIS) rank 16 on every conv and linear of the backbone: Tucker-2 on the channel
# modes of each conv with a kernel (1x1 in -> r, full k x k core r -> r, 1x1 r -> out; tucker,
# LyCORIS's use_tucker), LoRA's r (in k^2 + out) on linears; alpha 8 (scaling 8 / r).
# Methods differ only in model.backbone.peft (docs/recipes.md, docs/compare.md).
_base_ = './_base_/oriented-rcnn-le90_convnextv2-l_fpn_1x_dota.py'
model = dict(backbone=dict(peft=dict(
    _delete_=True, type='LoCon', rank=16, alpha=8, dropout=0.0, tucker=True,
    targets=dict(types=['Conv2d', 'Linear']))))
