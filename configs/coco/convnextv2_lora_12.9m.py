# LoRA at the paper's 12.9M budget on ConvNeXt-V2-L (Table 1, where LoRA has 12.94M).
# rank 42 (alpha as in the recipe): 12,930,120 adapter parameters,
# 6.583% of the 196,416,768-parameter pretrained backbone, +0.23% from 12.9M.
# Solved by `python tools/count_params.py CONFIG --budget 12.9M` (docs/compare.md);
# only the rank fields differ from convnextv2_lora_r16.py.
_base_ = './convnextv2_lora_r16.py'
model = dict(backbone=dict(peft=dict(rank=42)))
