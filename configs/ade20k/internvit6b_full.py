# full fine-tuning of the backbone.
# Methods differ only in model.backbone.peft.
_base_ = './_base_/upernet_internvit-6b_160k_ade20k-504x504.py'
model = dict(backbone=dict(peft=dict(_delete_=True, type='Full')))
