# FLoRA at the paper's 0.32% budget on InternViT-6B (Table 2).
# rank 8, kernel rank 1: 19,698,749 adapter parameters,
# 0.334% of the 5,906,121,600-parameter pretrained backbone, +4.23% from 0.32%.
# Solved by `python tools/count_params.py CONFIG --budget 0.32%` (docs/compare.md);
# only the rank fields differ from internvit6b_flora_r16.py.
_base_ = './internvit6b_flora_r16.py'
model = dict(backbone=dict(peft=dict(rank=8, kernel_rank=1)))
