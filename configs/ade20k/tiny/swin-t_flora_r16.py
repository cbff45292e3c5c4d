# Tiny variant of ../swin-t_flora_r16.py (UperNet) for CPU runs and CI: a Swin of 24-192
# channels and 2 blocks per stage (same block design and layer names) in random init (no
# pretrained file), 96x128 images of the generated tiny ADE20K (tools/make_tiny_data.py), the
# recipe's AdamW at the tiny configs' lr 2e-3, a short schedule, BN instead of SyncBN (one CPU
# process). Only model size, image size, data root, schedule and lr are overridden.
_base_ = '../swin-t_flora_r16.py'

data_root = 'data/tiny/ade/ADEChallengeData2016'
crop_size = (96, 128)
norm_cfg = dict(type='BN', requires_grad=True)

# -- model size
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(backbone=dict(embed_dims=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                drop_path_rate=0.0, init_cfg=None)),
    decode_head=dict(in_channels=[24, 48, 96, 192], channels=32, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=96, channels=16, norm_cfg=norm_cfg),
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
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', power=1.0, begin=10, end=max_iters, eta_min=0.0, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
