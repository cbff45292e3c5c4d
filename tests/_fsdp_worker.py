"""One rank of tests/test_fsdp.py (run by torchrun, gloo on the CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py OUT \
        BACKBONE:METHOD[:ac,bf16] [BACKBONE:METHOD[:OPTS] ...]

Builds the same small classifier twice from one seed (a tiny InternViT or ConvNeXt-V2-atto
backbone with a PEFT method, a linear head), wraps one copy in DDP and shards the other with
``flora_mm.engine.fsdp.shard_model``, trains both for a few AdamW steps on the same per-rank
batches (``ac``: torch's composable activation checkpointing per unit; ``bf16``: the units
compute in bf16 over fp32 parameters) and writes what the test checks to
OUT/BACKBONE-METHOD-OPTS/rank{R}.pt (one launch runs every case: each start of the two ranks
costs more CPU than a case):
losses, local shard sizes, the gathered trainable tensors of both copies, base checksums
sharded vs whole, update norms, and how many adapter inputs each copy rebuilt in backward
(the backbones' lean blocks, which run inside FSDP units as inside DDP).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import flora_mm  # noqa: F401
from flora_mm.apis.memory import plan_model
from flora_mm.dist import checksums, gather_full, is_sharded
from flora_mm.engine.fsdp import shard_model
from flora_mm.models import ConvNeXtV2, InternViT
from flora_mm.peft import adapter_layers, inject_adapters
from flora_mm.peft.io import base_fingerprint, base_state_names
from flora_mm.peft.norms import update_sq_norm
from flora_mm.ops.recomputed_input import RecomputeStats

STEPS = 4
PEFT = {
    'flora': dict(type='FLoRA', rank=4, kernel_rank=2, scale=1.0),
    'full': dict(type='Full'),
    'lora': dict(type='LoRA', rank=4),
    'dora': dict(type='DoRA', rank=4),
    'bitfit': dict(type='BitFit'),
}


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if is_sharded(t) else t
    return local.numel() * local.element_size()


class Net(nn.Module):
    def __init__(self, backbone: str, method: str) -> None:
        super().__init__()
        if backbone == 'internvit':
            self.backbone = InternViT(arch='tiny', img_size=28, with_fpn=False,
                                      out_indices=(3,))
            channels = 64
        elif backbone == 'resnet':  # mmdet's, batch norms in eval as its detection recipes
            from mmdet.models.backbones import ResNet
            self.backbone = ResNet(depth=18, out_indices=(3,), norm_eval=True)
            channels = 512
        elif backbone == 'swin':  # mmdet's
            from mmdet.models.backbones import SwinTransformer
            self.backbone = SwinTransformer(embed_dims=16, depths=(2, 2, 2, 2),
                                            num_heads=(1, 1, 2, 2), window_size=2,
                                            drop_path_rate=0.0, out_indices=(3,))
            channels = 128
        else:
            self.backbone = ConvNeXtV2(arch='atto', out_indices=(3,))
            channels = 320
        inject_adapters(self.backbone, PEFT[method])
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def case_dir(out: str, case: str) -> str:
    """OUT/BACKBONE-METHOD-OPTS for the case 'BACKBONE:METHOD[:OPTS]'."""
    return os.path.join(out, case.replace(':', '-').replace(',', '_'))


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group('gloo')
    for case in cases:
        backbone, method, *rest = case.split(':')
        opts = rest[0].split(',') if rest and rest[0] else []
        run_case(backbone, method, opts, case_dir(out, case))
    dist.destroy_process_group()


def run_case(backbone: str, method: str, opts: list, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = Net(backbone, method)
    sharded = copy.deepcopy(ref)
    base_names = base_state_names(ref.backbone)
    whole_sums = checksums({k: v for k, v in ref.backbone.state_dict().items()
                            if k in base_names})
    whole_fingerprint = base_fingerprint(ref.backbone)
    plan = plan_model(ref, dict(type='AdamW'), gpus=world, strategy='fsdp')
    ddp = DistributedDataParallel(ref)
    shard_model(sharded, activation_checkpointing='ac' in opts,
                param_dtype='bfloat16' if 'bf16' in opts else None)
    local = {n: (p.to_local().numel() if is_sharded(p) else p.numel(), p.numel(),
                 p.requires_grad) for n, p in sharded.named_parameters()}
    sharded_sums = checksums({k: v for k, v in sharded.backbone.state_dict().items()
                              if k in base_names})
    sharded_fingerprint = base_fingerprint(sharded.backbone)
    hidden = [n for n, layer in adapter_layers(sharded)
              if any(p is not None for p in layer.base_layer._parameters.values())]

    size = 28 if backbone == 'internvit' else 32
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    x = torch.randn(4, 3, size, size, generator=gen)
    y = torch.randint(0, 5, (4,), generator=gen)
    losses = {'ddp': [], 'fsdp': []}
    measured = {}
    for tag, model in (('ddp', ddp), ('fsdp', sharded)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        for step in range(STEPS):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if tag == 'fsdp' and step == STEPS - 1:
                measured['gradients'] = sum(_local_bytes(p.grad) for p in params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[tag].append(float(loss.detach()))
        if tag == 'fsdp':
            measured['optimizer'] = sum(_local_bytes(v) for state in opt.state.values()
                                        for v in state.values() if v.dim() > 0)
    rebuilt = {}  # one more forward + backward, counting the rebuilt adapter inputs
    for tag, net, model in (('ddp', ref, ddp), ('fsdp', sharded, sharded)):
        net.backbone.recompute_stats = stats = RecomputeStats()
        nn.functional.cross_entropy(model(x), y).backward()
        net.backbone.recompute_stats = None
        rebuilt[tag] = (stats.replaced, stats.recomputed)
    measured['params'] = {}
    for p in sharded.parameters():  # the padded shard FSDP allocated (rank 0: no padding)
        key = str(p.dtype).replace('torch.', '')
        measured['params'][key] = (measured['params'].get(key, 0)
                                   + p.to_local().untyped_storage().nbytes())
    trainable_names = [n for n, p in ref.named_parameters() if p.requires_grad]
    ref_params = dict(ref.named_parameters())
    shard_params = dict(sharded.named_parameters())
    gathered = gather_full({n: shard_params[n] for n in trainable_names})
    norms_sharded = {n: float(update_sq_norm(layer)) for n, layer in adapter_layers(sharded)}
    norms_whole = {n: float(layer.delta_weight().float().pow(2).sum())
                   for n, layer in adapter_layers(ref)}
    dtypes = sorted({str(p.dtype) for p in sharded.parameters()})
    torch.save(dict(
        rank=rank, dtypes=dtypes, world=world, losses=losses, local=local, hidden=hidden,
        whole_sums=whole_sums, sharded_sums=sharded_sums,
        fingerprints=(whole_fingerprint, sharded_fingerprint),
        ddp={n: ref_params[n].detach().clone() for n in trainable_names},
        plan=dict(params=dict(plan.params), gradients=plan.gradients, optimizer=plan.optimizer),
        measured=measured, rebuilt=rebuilt,
        fsdp=gathered, norms_sharded=norms_sharded, norms_whole=norms_whole,
    ), os.path.join(out, f'rank{rank}.pt'))


if __name__ == '__main__':
    main()
