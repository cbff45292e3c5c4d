# mmrotate's Oriented R-CNN le90 R-50 FPN 1x recipe as it is (oriented_rcnn/oriented-rcnn-le90_
# r50_fpn_1x_dota.py, inherited whole from mmrotate 1.0.0rc1's wheel: model, DOTA data, SGD lr
# 0.005 with gradient clipping 35, 12 epochs), with its ResNet-50 behind PEFTBackbone. The
# backbone dict is mmrotate's own (mmdet's ResNet, stem and stage 1 frozen, BatchNorm in eval
# mode), only the pretrained file is local. The PEFT method lives in model.backbone.peft only.
_base_ = [
    'mmrotate::oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py',
    '../../_base_/flora_runtime.py',
]
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
# torchvision's ImageNet ResNet-50 (what mmrotate's 'torchvision://resnet50' downloads)
pretrained = 'checkpoints/resnet50-0676ba61.pth'
model = dict(backbone=dict(
    _delete_=True,
    type='PEFTBackbone',
    backbone=dict(
        type='mmdet.ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    peft=dict(type='Frozen')))
# FLoRA's scale s for ResNet-50 (docs/recipes.md, "FLoRA scale s")
flora_scale = 4.0
# frozen_stages=1 freezes the stem and stage 1 on every train() call, adapters inside them too:
# adapters go to the layers that train under Full
peft_exclude = [r'^conv1$', r'^layer1\.']
