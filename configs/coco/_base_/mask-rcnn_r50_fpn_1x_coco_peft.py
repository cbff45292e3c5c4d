# mmdet's Mask R-CNN R-50 FPN 1x recipe as it is (mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py: SGD
# lr 0.02, momentum 0.9, wd 1e-4, 12 epochs, steps 8/11), with its ResNet-50 behind
# PEFTBackbone. The backbone dict is mmdet's own (stem and stage 1 frozen, BatchNorm in eval
# mode), only the pretrained file is local. The PEFT method lives in model.backbone.peft only.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', '../../_base_/flora_runtime.py']
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
# torchvision's ImageNet ResNet-50 (what mmdet's 'torchvision://resnet50' downloads)
pretrained = 'checkpoints/resnet50-0676ba61.pth'
model = dict(backbone=dict(
    _delete_=True,
    type='PEFTBackbone',
    backbone=dict(
        type='ResNet',
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
