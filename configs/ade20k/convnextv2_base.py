# the paper's "Base": frozen backbone, neck and heads train.
# Head-tuning settings (InternVL's frozen-backbone recipe): no drop path.
_base_ = './_base_/upernet_convnextv2-l_160k_ade20k-640x640.py'
model = dict(backbone=dict(backbone=dict(drop_path_rate=0.0),
                           peft=dict(_delete_=True, type='Frozen')))
