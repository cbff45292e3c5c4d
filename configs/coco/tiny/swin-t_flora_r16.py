# Tiny variant of ../swin-t_flora_r16.py for CPU runs and CI: the same model, data pipeline
# types, metric, hooks and AdamW recipe, with a Swin of 24-192 channels and 2 blocks per stage
# (same block design and layer names) in random init (no pretrained file), 96x128 images of the
# generated tiny COCO (tools/make_tiny_data.py) and a short schedule. Only model size, image
# size, data root, schedule and the learning rate (2e-3, as the other tiny configs) are
# overridden.
_base_ = '../swin-t_flora_r16.py'

data_root = 'data/tiny/coco/'
width = 64

# -- model size
model = dict(
    backbone=dict(backbone=dict(embed_dims=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                drop_path_rate=0.0, init_cfg=None)),
    neck=dict(in_channels=[24, 48, 96, 192], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=128),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200),
                   rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)))

# -- image size and data root
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# -- schedule (the recipe's optimizer at the tiny configs' lr; a short warm-up)
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[10],
         gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=2e-3))
default_hooks = dict(logger=dict(interval=6), checkpoint=dict(interval=max_epochs))
log_processor = dict(window_size=6)
