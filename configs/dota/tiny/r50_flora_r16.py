# Tiny variant of ../r50_flora_r16.py (Oriented R-CNN le90) for CPU runs and CI: a ResNet-18
# of 16 base channels (16-128 output channels) in random init (no pretrained file), 128x128
# patches of the generated tiny DOTA (tools/make_tiny_data.py), the recipe's SGD with gradient
# clipping, a short schedule. Only model size, image size, data root and schedule are
# overridden.
_base_ = '../r50_flora_r16.py'

data_root = 'data/tiny/split_ss_dota/'
width = 64

# -- model size: ResNet-18 (the same stem, stage and layer names). Random init with BN in eval
# mode: features grow with every residual sum (ResNet-50's 16 blocks: std ~40 at stage 4, and
# after one SGD step 1 of 3 test runs had no detection left), 8 blocks: std ~3.
# zero_init_residual off: with random init it zeroes each block's last BN weight, which stays
# frozen, and the adapters in the block would get no gradient
model = dict(
    backbone=dict(backbone=dict(depth=18, base_channels=16, zero_init_residual=False,
                                init_cfg=None)),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=width),
                  bbox_head=dict(in_channels=width, fc_out_channels=128)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200),
                   rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100),
                  rcnn=dict(nms_pre=300, max_per_img=50)))

# -- image size and data root
train_pipeline = [
    dict(type='mmdet.LoadImageFromFile'),
    dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
    dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
    dict(type='mmdet.Resize', scale=(128, 128), keep_ratio=True),
    dict(type='mmdet.RandomFlip', prob=0.75, direction=['horizontal', 'vertical', 'diagonal']),
    dict(type='mmdet.PackDetInputs'),
]
val_pipeline = [
    dict(type='mmdet.LoadImageFromFile'),
    dict(type='mmdet.Resize', scale=(128, 128), keep_ratio=True),
    dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
    dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
    dict(type='mmdet.PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, img_shape=(128, 128), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='test/annfiles/',
                 data_prefix=dict(img_path='test/images/'), img_shape=(128, 128),
                 pipeline=val_pipeline))
test_dataloader = val_dataloader

# -- schedule (the recipe's optimizer; a short warm-up)
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[10],
         gamma=0.1),
]
default_hooks = dict(logger=dict(interval=6), checkpoint=dict(interval=max_epochs))
log_processor = dict(window_size=6)
