# Mask R-CNN + FPN (mmdet's own base model) with ConvNeXt-V2-L behind PEFTBackbone.
# The PEFT method lives in model.backbone.peft only: leaf configs change nothing else.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)

# Official ConvNeXt-V2-L ImageNet-22k->1k fine-tuned weights (FCMAE release, official or timm
# key layout; see README "Pretrained checkpoints").
pretrained = 'checkpoints/convnextv2_large_22k_224_ema.pt'
model = dict(
    backbone=dict(
        _delete_=True,
        type='PEFTBackbone',
        backbone=dict(
            type='ConvNeXtV2',
            arch='large',
            out_indices=(0, 1, 2, 3),
            drop_path_rate=0.4,
            init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
        # the output norms are not in the pretrained checkpoint: they train under every method
        modules_to_save=[r'^norm\d$'],
        peft=dict(type='Frozen')),
    neck=dict(in_channels=[192, 384, 768, 1536]))
