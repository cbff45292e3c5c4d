# LoHa at the paper's 12.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 21 (alpha as in the recipe): 12,930,120 adapter parameters,
# 6.583% of the 196,416,768-parameter pretrained backbone, +0.23% from 12.9M.
# Solved by `python tools/count_params.py CONFIG --budget 12.9M --methods LoHa`
# (docs/compare.md); only the rank fields differ from convnextv2_loha_r16.py.
_base_ = './convnextv2_loha_r16.py'
model = dict(backbone=dict(peft=dict(rank=21)))
