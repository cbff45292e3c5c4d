# UperNet on InternViT-6B as in InternVL's segmentation code: features of blocks 11/23/35/47,
# a simple FPN (deconv x4, x2, identity, maxpool), UperNet channels 1536, crop 504,
# bf16 backbone with fp32 adapters, activation checkpointing.
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
pretrained = 'checkpoints/intern_vit_6b_224px.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    data_preprocessor=dict(size=(504, 504)),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='PEFTBackbone',
        backbone=dict(
            type='InternViT',
            arch='6b',
            img_size=504,
            out_indices=(11, 23, 35, 47),
            with_fpn=True,
            drop_path_rate=0.4,
            with_cp=True,
            dtype='bfloat16',
            init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
        # InternVL's simple FPN is not in the pretrained checkpoint: it trains under every method
        modules_to_save=[r'^up\d$'],
        peft=dict(type='Frozen')),
    decode_head=dict(in_channels=[3200, 3200, 3200, 3200], channels=1536, num_classes=150,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=3200, num_classes=150, norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(341, 341)))
