# LoCon at the paper's 51.8M budget on ConvNeXt-V2-L (not in the paper's Table 1).
# rank 169 (alpha as in the recipe): 51,689,709 adapter parameters,
# 26.316% of the 196,416,768-parameter pretrained backbone, -0.21% from 51.8M.
# Solved by `python tools/count_params.py CONFIG --budget 51.8M --methods LoCon`
# (docs/compare.md); only the rank fields differ from convnextv2_locon_r16.py.
_base_ = './convnextv2_locon_r16.py'
model = dict(backbone=dict(peft=dict(rank=169)))
