# mmdet's ConvNeXt 3x recipe: AdamW lr 1e-4, wd 0.05, AMP, 36 epochs, steps at 27 and 33.
# (mmdet's LearningRateDecayOptimizerConstructor is not used: it expects mmpretrain's ConvNeXt
# names, and a frozen backbone has no per-layer learning rates to decay.)
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
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
