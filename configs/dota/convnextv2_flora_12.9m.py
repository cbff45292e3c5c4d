# FLoRA at the paper's 12.9M budget on ConvNeXt-V2-L (Table 1, where FLoRA has 12.77M).
# rank 42, kernel rank 2: 12,840,493 adapter parameters,
# 6.537% of the 196,416,768-parameter pretrained backbone, -0.46% from 12.9M.
# Solved by `python tools/count_params.py CONFIG --budget 12.9M` (docs/compare.md);
# only the rank fields differ from convnextv2_flora_r16.py.
_base_ = './convnextv2_flora_r16.py'
model = dict(backbone=dict(peft=dict(rank=42, kernel_rank=2)))
