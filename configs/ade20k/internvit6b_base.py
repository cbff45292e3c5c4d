# the paper's "Base": frozen backbone, neck and heads train.
# Head-tuning settings (InternVL's frozen-backbone recipe): no drop path, auxiliary
# head on FPN level 1, no lr decay (it would only touch the trainable FPN, at scale 1).
_base_ = './_base_/upernet_internvit-6b_80k_ade20k-504x504.py'
model = dict(
    backbone=dict(backbone=dict(drop_path_rate=0.0),
                  peft=dict(_delete_=True, type='Frozen')),
    auxiliary_head=dict(in_index=1))
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=1.0))
