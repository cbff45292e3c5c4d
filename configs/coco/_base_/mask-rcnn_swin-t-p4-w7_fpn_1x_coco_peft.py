# mmdet's Swin-T Mask R-CNN 1x recipe as it is (swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py:
# AdamW lr 1e-4, wd 0.05, no weight decay for absolute_pos_embed, relative_position_bias_table
# and norms via paramwise_cfg.custom_keys, no layer decay, drop path 0.2, 12 epochs), with its
# Swin-T behind PEFTBackbone. The backbone dict is mmdet's own, only the pretrained file is
# local. The PEFT method lives in model.backbone.peft only.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../../_base_/flora_runtime.py']
custom_imports = dict(imports=['flora_mm'], allow_failed_imports=False)
# the official Swin-T ImageNet-1k release (converted on load: convert_weights=True)
pretrained = 'checkpoints/swin_tiny_patch4_window7_224.pth'
model = dict(backbone=dict(
    _delete_=True,
    type='PEFTBackbone',
    backbone=dict(
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    peft=dict(type='Frozen')))
# FLoRA's scale s for Swin-T (docs/recipes.md, "FLoRA scale s")
flora_scale = 4.0
