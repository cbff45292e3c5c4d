# the paper's "Base": frozen backbone, neck and heads train.
# Head-tuning settings (InternVL's frozen-backbone recipe): no drop path.
_base_ = './_base_/mask-rcnn_convnextv2-l_fpn_ms-crop-3x_coco.py'
model = dict(backbone=dict(backbone=dict(drop_path_rate=0.0),
                           peft=dict(_delete_=True, type='Frozen')))
