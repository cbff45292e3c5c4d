# mmseg's ADE20K 640x640 data; 2 images per GPU as in mmseg's ConvNeXt UperNet recipe (8 GPUs).
_base_ = 'mmseg::_base_/datasets/ade20k_640x640.py'
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
