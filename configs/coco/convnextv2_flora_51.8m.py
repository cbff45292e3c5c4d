# FLoRA at the paper's 51.8M budget on ConvNeXt-V2-L (Table 1, where FLoRA has 40.49M).
# rank 164, kernel rank 2: 51,816,565 adapter parameters,
# 26.381% of the 196,416,768-parameter pretrained backbone, +0.03% from 51.8M.
# Solved by `python tools/count_params.py CONFIG --budget 51.8M` (docs/compare.md);
# only the rank fields differ from convnextv2_flora_r16.py.
_base_ = './convnextv2_flora_r16.py'
model = dict(backbone=dict(peft=dict(rank=164, kernel_rank=2)))
