# Tiny variant of ../convnextv2_flora_r16.py (Oriented R-CNN le90) for CPU runs and CI:
# ConvNeXt-V2-atto, 128x128 patches of the generated tiny DOTA (tools/make_tiny_data.py), a short
# schedule. Only model size, image size, data root and schedule are overridden.
_base_ = '../convnextv2_flora_r16.py'

data_root = 'data/tiny/split_ss_dota/'
pretrained = 'data/tiny/checkpoints/convnextv2_atto.pth'
width = 64

# -- model size
model = dict(
    backbone=dict(backbone=dict(arch='atto', drop_path_rate=0.0,
                                init_cfg=dict(type='Pretrained', checkpoint=pretrained))),
    neck=dict(in_channels=[40, 80, 160, 320], out_channels=width),
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

# -- schedule (fp32: AMP needs a GPU; the recipe's lr decay)
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[10],
         gamma=0.1),
]
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     constructor='LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=12),
                     optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
                     clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(logger=dict(interval=6), checkpoint=dict(interval=max_epochs))
log_processor = dict(window_size=6)
