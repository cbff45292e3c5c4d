"""One rank of tests/test_meta_init.py (torchrun, gloo on the CPU, cwd holds data/tiny/checkpoints).

    python -m torch.distributed.run --nproc_per_node 2 tests/_meta_worker.py CONFIG OUT

For FLoRA and Full on the tiny InternViT ADE20K config (pretrained file
data/tiny/checkpoints/internvit_tiny.pth): the whole model initialised as one process / DDP do
it (``init_weights`` + the seed rule), and two sharded starts of the same config and seed, the
gathered one (built whole, ``FullyShardedModel(meta_init=False)``) and the meta-device one
(``meta_parameters`` + ``FullyShardedModel(meta_init=True)``), each built after another
global seed (the build's RNG stream must not matter). Each sharded copy trains 3 AdamW steps
on the same per-rank batches. Rank 0 writes OUT/rank{R}.pt: the three starts (gathered full
state), losses and final states of both sharded runs, the peak host RSS at start, and the
error a missing pretrained file gives on each rank under the meta start and unsharded.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS, init_default_scope
from mmengine.structures import PixelData

import flora_mm  # noqa: F401
from flora_mm.engine.fsdp import FullyShardedModel, full_model_state_dict
from flora_mm.engine.seeded_init import apply_seeded_init
from flora_mm.models.meta import meta_parameters
from flora_mm.utils import register_task_modules
from flora_mm.utils.host_memory import HostMemoryRecorder

SEED = 3
STEPS = 3


def _batch(rank: int) -> dict:
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(100 + rank)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 255, (3, 112, 140), generator=gen).float())
        sample = SegDataSample(metainfo=dict(img_shape=(112, 140), ori_shape=(112, 140)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 112, 140), generator=gen))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _start(model_cfg, tag: str, memory: dict):
    torch.manual_seed({'gathered': 5, 'meta': 11}[tag])  # unlike the reference's stream
    recorder = HostMemoryRecorder()
    if tag == 'meta':
        with meta_parameters():
            model = MODELS.build(model_cfg)
    else:
        model = MODELS.build(model_cfg)
    wrapped = FullyShardedModel(model, meta_init=tag == 'meta', init_seed=SEED)
    memory[tag] = recorder.record('start')
    return wrapped


def _train(wrapped, rank: int) -> tuple[list[float], dict]:
    torch.manual_seed(7)  # the Runner reseeds after init (reseed_after_init): same dropout
    params = [p for p in wrapped.module.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05))
    wrapped.train()
    losses = []
    for _ in range(STEPS):
        log_vars = wrapped.train_step(_batch(rank), optim)
        losses.append(float(log_vars['loss']))
    return losses, full_model_state_dict(wrapped.module)


def _error_of(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 (what the test compares)
        return f'{type(err).__name__}: {err}'
    return None


def main() -> None:
    config, out = sys.argv[1:3]
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    register_task_modules('mmseg')
    init_default_scope('mmseg')
    cfg = Config.fromfile(config)
    result = dict(rank=rank)
    for method in ('flora', 'full'):
        model_cfg = copy.deepcopy(cfg.model)
        if method == 'full':
            model_cfg.backbone.peft = dict(type='Full')
        torch.manual_seed(SEED)
        whole = MODELS.build(model_cfg)  # one process / DDP: FLoRARunner._init_model_weights
        whole.init_weights()
        apply_seeded_init(whole, SEED)
        result[method] = dict(reference={k: v.clone() for k, v in whole.state_dict().items()},
                              memory={})
        del whole
        for tag in ('gathered', 'meta'):
            wrapped = _start(model_cfg, tag, result[method]['memory'])
            start = {k: v.clone() for k, v in full_model_state_dict(wrapped.module).items()}
            losses, final = _train(wrapped, rank)
            result[method][tag] = dict(start=start, losses=losses, final=final)
            del wrapped
    # a missing pretrained file: today's error, on every rank (no hang)
    bad = copy.deepcopy(cfg.model)
    bad.backbone.backbone.init_cfg = dict(type='Pretrained', checkpoint='data/missing.pth')

    def meta_start():
        with meta_parameters():
            model = MODELS.build(bad)
        FullyShardedModel(model, meta_init=True, init_seed=SEED)

    result['errors'] = dict(meta=_error_of(meta_start),
                            whole=_error_of(lambda: MODELS.build(bad).init_weights()))
    torch.save(result, os.path.join(out, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
