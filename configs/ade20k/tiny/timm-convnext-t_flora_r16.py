# Tiny variant of ../timm-convnext-t_flora_r16.py (UperNet over timm's TIMMBackbone) for CPU
# runs and CI: timm's convnext_atto (the same family: 40-320 channels) in random init (no
# pretrained file), 96x128 images of the generated tiny ADE20K (tools/make_tiny_data.py), fp32
# (AMP needs a GPU) with the recipe's AdamW at the tiny configs' lr 2e-3, a short schedule, BN
# instead of SyncBN. Only model size, image size, data root, schedule and lr are overridden.
_base_ = '../timm-convnext-t_flora_r16.py'

data_root = 'data/tiny/ade/ADEChallengeData2016'
crop_size = (96, 128)
norm_cfg = dict(type='BN', requires_grad=True)

# -- model size
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(backbone=dict(_delete_=True, type='TIMMBackbone', model_name='convnext_atto',
                                features_only=True, pretrained=False, drop_path_rate=0.0)),
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

# -- schedule
max_iters = 120
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(flat_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', power=1.0, begin=10, end=max_iters, eta_min=0.0, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
