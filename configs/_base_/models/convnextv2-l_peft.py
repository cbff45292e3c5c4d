# ConvNeXt-V2-L behind PEFTBackbone, the one definition the COCO, ADE20K and DOTA model bases
# share (each sets `model = dict(backbone={{_base_.convnextv2_l_peft}}, ...)`). `_delete_`
# drops the keys of the task base's own backbone when merged. The method lives in `peft` only
# (Frozen here; leaf configs replace it).
# Official ConvNeXt-V2-L ImageNet-22k->1k fine-tuned weights (FCMAE release, official or timm
# key layout; see README "Pretrained checkpoints").
pretrained = 'checkpoints/convnextv2_large_22k_224_ema.pt'
convnextv2_l_peft = dict(
    _delete_=True,
    type='PEFTBackbone',
    backbone=dict(
        type='ConvNeXtV2',
        arch='large',
        out_indices=(0, 1, 2, 3),
        # mmdet's and mmseg's ConvNeXt recipes (full fine-tuning); Frozen sets 0.0
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    peft=dict(type='Frozen'))
# FLoRA's scale s for ConvNeXt-V2-L, for the authors' factor init: the authors' own ConvNeXt
# example (r = [16, 16, 2, 2], scale 4.0), one of the paper's {0.04, 0.4, 4}
flora_scale = 4.0
