# FLoRA at the paper's 25.9M budget on ConvNeXt-V2-L (Table 1, where FLoRA has 25.65M).
# rank 84, kernel rank 1: 25,902,389 adapter parameters,
# 13.187% of the 196,416,768-parameter pretrained backbone, +0.01% from 25.9M.
# Solved by `python tools/count_params.py CONFIG --budget 25.9M` (docs/compare.md);
# only the rank fields differ from convnextv2_flora_r16.py.
_base_ = './convnextv2_flora_r16.py'
model = dict(backbone=dict(peft=dict(rank=84, kernel_rank=1)))
