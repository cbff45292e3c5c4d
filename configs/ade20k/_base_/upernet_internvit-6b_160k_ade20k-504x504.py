_base_ = [
    './models/upernet_internvit-6b.py',
    './datasets/ade20k_504x504.py',
    './schedules/adamw_160k.py',
    './default_runtime.py',
]
# InternVL's segmentation recipe trains the 6B backbone in bf16 with 4e-5 (head tuning / PEFT)
optim_wrapper = dict(optimizer=dict(lr=4e-5))
