# DoRA at the paper's 25.9M budget on ConvNeXt-V2-L (Table 1, where DoRA has 26.16M).
# rank 84 (alpha as in the recipe): 26,025,552 adapter parameters,
# 13.250% of the 196,416,768-parameter pretrained backbone, +0.48% from 25.9M.
# Solved by `python tools/count_params.py CONFIG --budget 25.9M` (docs/compare.md);
# only the rank fields differ from convnextv2_dora_r16.py.
_base_ = './convnextv2_dora_r16.py'
model = dict(backbone=dict(peft=dict(rank=84)))
