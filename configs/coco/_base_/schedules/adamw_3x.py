# mmdet's ConvNeXt Mask R-CNN 3x recipe (mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py):
# AdamW lr 1e-4, wd 0.05, AMP (fp16), 36 epochs, steps at 27 and 33, layer-wise lr decay 0.95.
# Its LearningRateDecayOptimizerConstructor reads mmpretrain's ConvNeXt names; flora_mm's
# constructor applies the same rule to our timm-layout names (and to adapter tensors).
# num_layers 12 instead of ConvNeXt-T's 6: ConvNeXt-V2-L has 27 blocks in its third stage, as
# ConvNeXt-S in mmdet's configs with num_layers 12. Every method uses this optimizer
# (docs/recipes.md).
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1),
]
optim_wrapper = dict(
    type='AmpOptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=12),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
