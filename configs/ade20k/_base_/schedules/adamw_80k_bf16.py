# InternVL's InternViT-6B UperNet recipe (segmentation/configs/intern_vit_6b/full_tuning/
# upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py): AdamW lr 4e-5, wd 0.05, layer-wise lr
# decay 0.95 over 48 layers (InternVL's CustomLayerDecayOptimizerConstructor), 1500 linear
# warm-up iterations from 1e-6, poly to 80k iterations, 8 GPUs x 2 images. InternVL trains in
# bf16 (DeepSpeed): here bf16 autocast, never fp16, with no loss scaling (bf16 needs none).
_base_ = 'mmseg::_base_/schedules/schedule_80k.py'
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='bfloat16',
    loss_scale=1.0,
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=48))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=80000, eta_min=0.0, by_epoch=False),
]
# InternVL evaluates and checkpoints every 1000 iterations
train_cfg = dict(val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=1000, max_keep_ckpts=2))
