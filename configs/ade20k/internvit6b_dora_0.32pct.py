# DoRA at the paper's 0.32% budget on InternViT-6B (Table 2).
# rank 7 (alpha as in the recipe): 18,615,316 adapter parameters,
# 0.315% of the 5,906,121,600-parameter pretrained backbone, -1.50% from 0.32%.
# Solved by `python tools/count_params.py CONFIG --budget 0.32%` (docs/compare.md);
# only the rank fields differ from internvit6b_dora_r16.py.
_base_ = './internvit6b_dora_r16.py'
model = dict(backbone=dict(peft=dict(rank=7)))
