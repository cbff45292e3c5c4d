# mmrotate's full Oriented R-CNN le90 1x DOTA config (OrientedRPNHead + MidpointOffsetCoder, RoIAlignRotated,
# rbox Shared2FCBBoxHead) with ConvNeXt-V2-L behind PEFTBackbone.
_base_ = 'mmrotate::oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py'
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
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
