# full fine-tuning of the backbone: InternVL's full-tuning recipe. The weights train
# in fp32 under bf16 autocast (InternVL: DeepSpeed bf16 with fp32 master weights),
# not in the bf16 the frozen backbone of the other methods is stored in.
_base_ = './_base_/upernet_internvit-6b_80k_ade20k-504x504.py'
model = dict(backbone=dict(backbone=dict(dtype='float32'),
                           peft=dict(_delete_=True, type='Full')))
