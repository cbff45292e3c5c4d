# LoKr at the paper's 25.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 185, decompose_factor 2 (alpha as in the recipe): 25,930,454 adapter parameters,
# 13.202% of the 196,416,768-parameter pretrained backbone, +0.12% from 25.9M.
# Solved by `python tools/count_params.py CONFIG --budget 25.9M --methods LoKr`
# (docs/compare.md); only rank and decompose_factor differ from convnextv2_lokr_r16.py.
_base_ = './convnextv2_lokr_r16.py'
model = dict(backbone=dict(peft=dict(rank=185, decompose_factor=2)))
