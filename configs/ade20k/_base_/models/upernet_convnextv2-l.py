# UperNet (mmseg's ConvNeXt UperNet base: UPerHead channels 512, FCN auxiliary head on stage 3
# with loss weight 0.4) with ConvNeXt-V2-L behind PEFTBackbone, as mmseg's
# convnext-large_upernet_8xb2-amp-160k_ade20k-640x640.py sets it up (slide test, stride 426).
_base_ = [
    'mmseg::_base_/models/upernet_convnext.py',
    '../../../_base_/models/convnextv2-l_peft.py',
]
custom_imports = dict(_delete_=True, imports=['flora_mm'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(size=(640, 640)),
    backbone={{_base_.convnextv2_l_peft}},
    decode_head=dict(in_channels=[192, 384, 768, 1536], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=(640, 640), stride=(426, 426)))
# used once above: not kept as a setting of its own (so the final config names the
# backbone once, and a merged/exported config holds no PEFTBackbone)
convnextv2_l_peft = None
