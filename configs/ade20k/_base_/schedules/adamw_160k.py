# mmseg's ConvNeXt UperNet recipe: AdamW lr 1e-4, wd 0.05, AMP, 1500 warm-up iterations, PolyLR
# to 160k iterations (8 GPUs x 2 images: see the dataset bases). (No
# LearningRateDecayOptimizerConstructor: see the COCO schedule.)
_base_ = 'mmseg::_base_/schedules/schedule_160k.py'
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    loss_scale='dynamic')
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0, by_epoch=False),
]
