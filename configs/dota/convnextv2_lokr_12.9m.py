# LoKr at the paper's 12.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 88, decompose_factor 2 (alpha as in the recipe): 12,902,486 adapter parameters,
# 6.569% of the 196,416,768-parameter pretrained backbone, +0.02% from 12.9M.
# Solved by `python tools/count_params.py CONFIG --budget 12.9M --methods LoKr`
# (docs/compare.md); only rank and decompose_factor differ from convnextv2_lokr_r16.py.
_base_ = './convnextv2_lokr_r16.py'
model = dict(backbone=dict(peft=dict(rank=88, decompose_factor=2)))
