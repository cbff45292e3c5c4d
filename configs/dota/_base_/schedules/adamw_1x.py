# mmrotate's 1x schedule (12 epochs, steps at 8 and 11, 500 warm-up iterations, gradient
# clipping at 35) with the optimizer of its transformer-backbone recipe
# (oriented-rcnn-le90_swin-tiny_fpn_1x_dota.py: AdamW lr 1e-4, wd 0.05). mmrotate has no
# ConvNeXt recipe: instead of the Swin recipe's backbone lr_mult 0.1 the backbone gets mmdet's
# ConvNeXt detection decay (layer-wise 0.95, num_layers 12, as COCO), and AMP (fp16) as in
# mmdet's ConvNeXt recipe (docs/recipes.md).
_base_ = 'mmrotate::_base_/schedules/schedule_1x.py'
optim_wrapper = dict(
    type='AmpOptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=12),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=35, norm_type=2))
