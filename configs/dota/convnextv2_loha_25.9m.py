# LoHa at the paper's 25.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 42 (alpha as in the recipe): 25,860,240 adapter parameters,
# 13.166% of the 196,416,768-parameter pretrained backbone, -0.15% from 25.9M.
# Solved by `python tools/count_params.py CONFIG --budget 25.9M --methods LoHa`
# (docs/compare.md); only the rank fields differ from convnextv2_loha_r16.py.
_base_ = './convnextv2_loha_r16.py'
model = dict(backbone=dict(peft=dict(rank=42)))
