# LoCon at the paper's 25.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 85 (alpha as in the recipe): 25,912,125 adapter parameters,
# 13.192% of the 196,416,768-parameter pretrained backbone, +0.05% from 25.9M.
# Solved by `python tools/count_params.py CONFIG --budget 25.9M --methods LoCon`
# (docs/compare.md); only the rank fields differ from convnextv2_locon_r16.py.
_base_ = './convnextv2_locon_r16.py'
model = dict(backbone=dict(peft=dict(rank=85)))
