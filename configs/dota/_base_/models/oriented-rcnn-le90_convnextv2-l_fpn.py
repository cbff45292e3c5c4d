# Oriented R-CNN le90 (mmrotate's model) with ConvNeXt-V2-L behind PEFTBackbone.
# The PEFT method lives in model.backbone.peft only.
_base_ = [
    './oriented-rcnn-le90_r50_fpn.py',
    '../../../_base_/models/convnextv2-l_peft.py',
]
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
model = dict(
    backbone={{_base_.convnextv2_l_peft}},
    neck=dict(in_channels=[192, 384, 768, 1536]))
# used once above: not kept as a setting of its own (so the final config names the
# backbone once, and a merged/exported config holds no PEFTBackbone)
convnextv2_l_peft = None
