# Tiny variant of ../convnextv2_flora_r16.py (UperNet) for CPU runs and CI: ConvNeXt-V2-atto,
# 96x128 images of the generated tiny ADE20K (tools/make_tiny_data.py), a short schedule,
# BN instead of SyncBN (one CPU process). Only model size, image size, data root and schedule
# are overridden.
_base_ = '../convnextv2_flora_r16.py'

data_root = 'data/tiny/ade/ADEChallengeData2016'
pretrained = 'data/tiny/checkpoints/convnextv2_atto.pth'
crop_size = (96, 128)
norm_cfg = dict(type='BN', requires_grad=True)

# -- model size
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(backbone=dict(arch='atto', drop_path_rate=0.0,
                                init_cfg=dict(type='Pretrained', checkpoint=pretrained))),
    decode_head=dict(in_channels=[40, 80, 160, 320], channels=32, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=160, channels=16, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='whole'))

# -- image size and data root
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

# -- schedule (fp32: AMP needs a GPU; the recipe's lr decay)
max_iters = 120
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     constructor='LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12),
                     optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', power=1.0, begin=10, end=max_iters, eta_min=0.0, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
