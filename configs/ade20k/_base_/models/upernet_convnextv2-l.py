# UperNet (mmseg's ConvNeXt UperNet base: UPerHead channels 512, FCN auxiliary head on stage 3
# with loss weight 0.4) with ConvNeXt-V2-L behind PEFTBackbone.
_base_ = 'mmseg::_base_/models/upernet_convnext.py'
custom_imports = dict(_delete_=True, imports=['flora_mm'], allow_failed_imports=False)
pretrained = 'checkpoints/convnextv2_large_22k_224_ema.pt'
model = dict(
    data_preprocessor=dict(size=(640, 640)),
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
    decode_head=dict(in_channels=[192, 384, 768, 1536], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(640, 640), stride=(426, 426)))
