# mmrotate's Oriented R-CNN le90 1x DOTA config (its model, data, schedule and runtime) with
# ConvNeXt-V2-L behind PEFTBackbone; the optimizer follows mmrotate's transformer-backbone recipe
# (oriented-rcnn-le90_swin-tiny_fpn_1x_dota.py: AdamW lr 1e-4, wd 0.05) with its gradient
# clipping, in AMP.
_base_ = './models/oriented-rcnn-le90_convnextv2-l_fpn.py'
optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=35, norm_type=2))
custom_hooks = [dict(type='FLoRAHook', norm_interval=50)]
