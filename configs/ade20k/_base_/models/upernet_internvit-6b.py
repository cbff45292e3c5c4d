# UperNet on InternViT-6B as in InternVL's segmentation configs (full_tuning/ and head_tuning/
# upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5*.py): features of blocks 11/23/35/47, a
# simple FPN (deconv x4, x2, identity, maxpool), UperNet and auxiliary head channels 1536,
# crop 504, slide test with stride 322, drop path 0.4 (full tuning; Frozen sets 0.0),
# activation checkpointing; the frozen backbone is stored in bf16, adapters stay fp32.
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
pretrained = 'checkpoints/intern_vit_6b_224px.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)
# FLoRA's scale s for InternViT-6B: one of the paper's {0.04, 0.4, 4}; the paper does not say
# which backbone used which (docs/recipes.md)
flora_scale = 0.4
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
        peft=dict(type='Frozen')),
    decode_head=dict(in_channels=[3200, 3200, 3200, 3200], channels=1536, num_classes=150,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=3200, channels=1536, num_classes=150, norm_cfg=norm_cfg),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322)))
