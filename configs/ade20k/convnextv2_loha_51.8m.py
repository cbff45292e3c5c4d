# LoHa at the paper's 51.8M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 84 (alpha as in the recipe): 51,720,480 adapter parameters,
# 26.332% of the 196,416,768-parameter pretrained backbone, -0.15% from 51.8M.
# Solved by `python tools/count_params.py CONFIG --budget 51.8M --methods LoHa`
# (docs/compare.md); only the rank fields differ from convnextv2_loha_r16.py.
_base_ = './convnextv2_loha_r16.py'
model = dict(backbone=dict(peft=dict(rank=84)))
