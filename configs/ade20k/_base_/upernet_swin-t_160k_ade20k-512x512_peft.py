# mmseg's Swin-T UperNet recipe as it is (swin/swin-tiny-patch4-window7-in1k-pre_upernet_
# 8xb2-160k_ade20k-512x512.py: AdamW lr 6e-5, wd 0.01, no weight decay for
# absolute_pos_embed, relative_position_bias_table and norms via paramwise_cfg.custom_keys, no
# layer decay, drop path 0.3, 1500 warm-up iterations, poly to 160k, fp32), with its Swin-T behind
# PEFTBackbone. The backbone dict is mmseg's own, only the pretrained file is local. The PEFT
# method lives in model.backbone.peft only.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../_base_/flora_runtime.py',
]
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
# mmseg's converted Swin-T ImageNet-1k file (what its recipe downloads)
pretrained = 'checkpoints/swin_tiny_patch4_window7_224_20220317-1cdeb081.pth'
model = dict(backbone=dict(
    _delete_=True,
    type='PEFTBackbone',
    backbone=dict(
        type='SwinTransformer',
        pretrain_img_size=224,
        embed_dims=96,
        patch_size=4,
        window_size=7,
        mlp_ratio=4,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        strides=(4, 2, 2, 2),
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        qk_scale=None,
        patch_norm=True,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.3,
        use_abs_pos_embed=False,
        act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    peft=dict(type='Frozen')))
# FLoRA's scale s for Swin-T (docs/recipes.md, "FLoRA scale s")
flora_scale = 4.0
