# UperNet over a timm model: mmseg's ConvNeXt-T UperNet recipe (convnext/convnext-tiny_upernet_
# 8xb2-amp-160k_ade20k-512x512.py: AdamW lr 1e-4, wd 0.05, AMP, drop path 0.4, 1500 warm-up
# iterations, poly to 160k, crop 512, slide test) with timm's convnext_tiny in its place,
# through mmseg's TIMMBackbone (features_only: the four stage outputs, 96/192/384/768 channels).
# Any timm model with features_only works the same way: set model_name and the heads'
# in_channels (timm.create_model(name, features_only=True).feature_info.channels()).
_base_ = [
    'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py',
    '../../_base_/flora_runtime.py',
]
custom_imports = dict(_delete_=True, imports=['flora_mm'], allow_failed_imports=False)
# timm's convnext_tiny.fb_in1k weights (the hub's model.safetensors), read from the local file
# before timm wraps the model for features_only
pretrained = 'checkpoints/convnext_tiny.fb_in1k.safetensors'
model = dict(
    backbone=dict(
        _delete_=True,
        type='PEFTBackbone',
        backbone=dict(
            type='TIMMBackbone',
            model_name='convnext_tiny',
            features_only=True,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=pretrained),
            drop_path_rate=0.4),
        peft=dict(type='Frozen')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
# The recipe's stage-wise lr decay (mmseg's LearningRateDecayOptimizerConstructor reads
# mmpretrain's ConvNeXt names only): flora_mm's constructor, whose TIMMBackbone description
# takes the stages from timm's feature_info (docs/backbones.md), with the recipe's values
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6),
    loss_scale='dynamic')
# FLoRA's scale s for ConvNeXt-T (docs/recipes.md, "FLoRA scale s")
flora_scale = 4.0
