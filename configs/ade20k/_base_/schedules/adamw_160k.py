# mmseg's ConvNeXt UperNet recipe (convnext-large_upernet_8xb2-amp-160k_ade20k-640x640.py):
# AdamW lr 1e-4, wd 0.05, AMP (fp16), stage-wise lr decay 0.9 over num_layers 12, 1500 warm-up
# iterations, PolyLR to 160k iterations (8 GPUs x 2 images: see the dataset bases).
# mmseg's LearningRateDecayOptimizerConstructor reads mmpretrain's ConvNeXt names; flora_mm's
# constructor applies the same rule to our timm-layout names (and to adapter tensors).
_base_ = 'mmseg::_base_/schedules/schedule_160k.py'
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12),
    loss_scale='dynamic')
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0, by_epoch=False),
]
