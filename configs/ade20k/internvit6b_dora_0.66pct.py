# DoRA at the paper's 0.66% budget on InternViT-6B (Table 2).
# rank 15 (alpha as in the recipe): 38,306,420 adapter parameters,
# 0.649% of the 5,906,121,600-parameter pretrained backbone, -1.73% from 0.66%.
# Solved by `python tools/count_params.py CONFIG --budget 0.66%` (docs/compare.md);
# only the rank fields differ from internvit6b_dora_r16.py.
_base_ = './internvit6b_dora_r16.py'
model = dict(backbone=dict(peft=dict(rank=15)))
