"""Runs of tests/test_dcp_fsdp.py, several in one process group (each a Runner, as
``flora_mm.apis.runner.train`` builds it), so the test pays the start of torch / mmengine /
gloo once per world size.

    python -m torch.distributed.run --nproc_per_node N tests/_dcp_worker.py PLAN.json OUT
    python tests/_dcp_worker.py PLAN.json OUT          # one process, no launcher: unsharded

PLAN.json is a list of runs: ``name``, ``config``, ``work_dir``, ``options`` (cfg options, a
dict), and optionally ``kind='test'`` (evaluate ``checkpoint`` as tools/test.py does),
``peft`` (replaces ``model.backbone.peft``), ``resume`` (a checkpoint path, or ``'auto'``),
``dump`` (record the model and optimizer state right after loading, gathered, keyed by
names), ``copy_without`` ([source, target, file]: first copy a checkpoint directory leaving
one file out), ``fail_save_on_rank`` (a hook fails the save on that rank) and
``expect_error`` (the run must fail; its message is recorded). Each rank writes
OUT/<name>_rank<R>.pt: the losses (message hub history), the error if any, the step's
seconds, and on rank 0 the dump.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

import flora_mm  # noqa: F401
from flora_mm.apis.config import load_runner_config
from flora_mm.apis.runner import apply_resume, build_runner, restore_run_seed
from flora_mm.checkpoint import mmengine_checkpoint_globals
from flora_mm.engine.fsdp import (full_model_state_dict, full_optimizer_state_dict,
                                  is_fully_sharded)
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper


class DumpAfterLoadHook(Hook):
    """``before_train`` (after load / resume): the whole model and optimizer state, keyed by
    names, on rank 0 (gathered from the shards under FSDP)."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.dump = None

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        optimizer = runner.optim_wrapper.optimizer
        if is_fully_sharded(runner.model):
            state = full_model_state_dict(model)  # every rank gathers; {} on ranks > 0
            optim = (full_optimizer_state_dict(model, optimizer).get('state', {})
                     if optimizer.state else {})
        else:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            names = {id(p): n for n, p in model.named_parameters()}
            optim = {names[id(p)]: {k: v.clone() for k, v in s.items()}
                     for p, s in optimizer.state.items()}
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:  # copies: the gathered dict may hold the live buffers (CPU, no offload)
            state = {k: v.detach().clone() for k, v in state.items()}
            optim = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                     for n, s in optim.items()}
            self.dump = dict(state_dict=state, optimizer=optim, iter=runner.iter,
                             world_size=runner.world_size,
                             sharded=is_fully_sharded(runner.model))


class FailSaveHook(Hook):
    """Raises in ``before_save_checkpoint`` on one rank only, after FLoRAHook's parts (the
    adapter files are staged by then): no rank may write anything."""

    priority = 'LOW'

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if dist.get_rank() == self.rank:
            raise RuntimeError(f'injected failure on rank {self.rank}')


def run_test(step: dict, launcher: str) -> dict:
    """What tools/test.py runs (``flora_mm.cli.test`` -> ``flora_mm.apis.test``)."""
    from flora_mm.apis.runner import test
    metrics = test(step['config'], step['checkpoint'], work_dir=step['work_dir'],
                   cfg_options=step.get('options'), launcher=launcher)
    return dict(metrics={k: float(v) for k, v in metrics.items()})


def run(step: dict, launcher: str) -> dict:
    if step.get('copy_without'):  # a damaged copy of a checkpoint directory
        source, target, left_out = step['copy_without']
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(left_out))
        if dist.is_initialized():
            dist.barrier()
    if step.get('kind') == 'test':
        return run_test(step, launcher)
    cfg = load_runner_config(step['config'], step.get('options'), launcher, step['work_dir'])
    cfg.experiment_name = step['name']  # unique: mmengine names loggers and hubs by it
    if step.get('peft') is not None:
        cfg.model.backbone.peft = step['peft']
    apply_resume(cfg, step.get('resume'))
    restore_run_seed(cfg)
    runner = build_runner(cfg)
    if step.get('fail_save_on_rank') is not None:
        runner.register_hook(FailSaveHook(step['fail_save_on_rank']))
    hook = None
    if step.get('dump'):
        hook = DumpAfterLoadHook()
        runner.register_hook(hook)
    with mmengine_checkpoint_globals():
        runner.train()
    losses = runner.message_hub.get_scalar('train/loss').data[0].tolist()
    return dict(losses=losses, dump=hook.dump if hook is not None else None,
                world_size=runner.world_size, sharded=is_fully_sharded(runner.model))


def main() -> None:
    plan_file, out = sys.argv[1:3]
    with open(plan_file) as f:
        plan = json.load(f)
    launcher = 'pytorch' if 'LOCAL_RANK' in os.environ else 'none'
    for step in plan:
        start = time.time()
        try:
            result = run(step, launcher)
            result['error'] = None
        except Exception as err:  # noqa: BLE001 (recorded: the test compares it)
            if not step.get('expect_error'):
                raise
            result = dict(error=f'{type(err).__name__}: {err}')
        rank = dist.get_rank() if dist.is_initialized() else 0
        result['seconds'] = time.time() - start
        if rank == 0:
            print(f'_dcp_worker: {step["name"]} {result["seconds"]:.1f} s', file=sys.stderr)
        torch.save(result, os.path.join(out, f'{step["name"]}_rank{rank}.pt'))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
