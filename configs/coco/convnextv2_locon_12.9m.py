# LoCon at the paper's 12.9M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 42 (alpha as in the recipe): 12,781,989 adapter parameters,
# 6.508% of the 196,416,768-parameter pretrained backbone, -0.91% from 12.9M.
# Solved by `python tools/count_params.py CONFIG --budget 12.9M --methods LoCon`
# (docs/compare.md); only the rank fields differ from convnextv2_locon_r16.py.
_base_ = './convnextv2_locon_r16.py'
model = dict(backbone=dict(peft=dict(rank=42)))
