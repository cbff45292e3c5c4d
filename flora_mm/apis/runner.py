"""Train and test from a config: what tools/train.py and tools/test.py do, as functions.

Same options and behaviour as the OpenMMLab packages' tools (mmdet 3.1.0 flavour, a superset of
the mmseg 1.2.2 and mmrotate 1.0.0rc1 ones); ``--out`` follows the config's package.
"""
from __future__ import annotations

import logging
import os.path as osp
import warnings
from copy import deepcopy
from typing import Optional

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..checkpoint import (CheckpointError, find_resumable_checkpoint, load_checkpoint_meta,
                          mmengine_checkpoint_globals)
from ..utils import config_dicts
from .config import (adapt_to_cpu_distributed, get_scope, init_cpu_process_group,
                     load_runner_config)
from .model import is_flora_hook


def build_runner(cfg: Config) -> Runner:
    """flora_mm's Runner (mmengine's + the seed rule, ``FLoRARunner``), or ``runner_type``
    from the registry when the config names one."""
    from ..engine.seeded_init import FLoRARunner
    adapt_to_cpu_distributed(cfg)
    init_cpu_process_group(cfg)
    if 'runner_type' not in cfg:
        return FLoRARunner.from_cfg(cfg)
    return RUNNERS.build(cfg)


# --------------------------------------------------------------------------- train
def enable_amp(cfg: Config) -> None:
    """--amp: ``OptimWrapper`` -> ``AmpOptimWrapper`` with a dynamic loss scale."""
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if optim_wrapper == 'AmpOptimWrapper':
        print_log('AMP training is already enabled in your config.', logger='current',
                  level=logging.WARNING)
        return
    assert optim_wrapper == 'OptimWrapper', (
        '`--amp` is only supported when the optimizer wrapper type is '
        f'`OptimWrapper` but got {optim_wrapper}.')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def enable_auto_scale_lr(cfg: Config) -> None:
    if ('auto_scale_lr' in cfg and 'enable' in cfg.auto_scale_lr
            and 'base_batch_size' in cfg.auto_scale_lr):
        cfg.auto_scale_lr.enable = True
    else:
        raise RuntimeError('Can not find "auto_scale_lr" or "auto_scale_lr.enable" or '
                           '"auto_scale_lr.base_batch_size" in your configuration file.')


def apply_resume(cfg: Config, resume: Optional[str]) -> None:
    """--resume (no value, 'auto'): latest checkpoint of work_dir; --resume PATH: that one."""
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


def restore_run_seed(cfg: Config) -> None:
    """A resume whose config sets no seed continues with the seed of the run it resumes.

    mmengine draws a seed when the config has none, records it in each checkpoint and sets it
    again on resume, but only after the dataloaders were built with the new one: the sampler's
    order and the workers' seeds would differ from the original run's. So the seed is read from
    the checkpoint (memory-mapped: only its metadata is touched) and put into the config before
    the Runner is built. An auto ``--resume`` is resolved to the newest complete checkpoint here
    for the same reason. Nothing changes when the config sets a seed or nothing is resumed.
    """
    if not cfg.get('resume') or (cfg.get('randomness') or {}).get('seed') is not None:
        return
    path = cfg.get('load_from') or find_resumable_checkpoint(cfg.work_dir)
    if path is None:
        return  # nothing to resume: mmengine starts a new run
    cfg.load_from = path
    try:
        with mmengine_checkpoint_globals():
            meta = load_checkpoint_meta(path)  # a file: mmapped; a DCP directory: its extra
    except (CheckpointError, OSError, AttributeError):
        return  # the Runner's own load reports what is wrong with the file
    seed = meta.get('seed') if isinstance(meta, dict) else None
    if isinstance(seed, int) and not isinstance(seed, bool):
        cfg.randomness = dict(cfg.get('randomness') or {}, seed=seed)
        print_log(f'resuming with the seed of {path}: {seed}', logger='current')


def train(config: str, work_dir: Optional[str] = None, resume: Optional[str] = None,
          amp: bool = False, auto_scale_lr: bool = False, cfg_options: Optional[dict] = None,
          launcher: str = 'none') -> Runner:
    """Train ``config`` as ``tools/train.py`` does; returns the Runner after training."""
    cfg = load_runner_config(config, cfg_options, launcher, work_dir)
    if amp:
        enable_amp(cfg)
    if auto_scale_lr:
        enable_auto_scale_lr(cfg)
    apply_resume(cfg, resume)
    restore_run_seed(cfg)
    runner = build_runner(cfg)
    # checkpoints written by plain mmengine (resume, load_from) carry numpy / HistoryBuffer
    # objects: allowed for this run only (flora_mm.checkpoint)
    with mmengine_checkpoint_globals():
        runner.train()
    return runner


# --------------------------------------------------------------------------- test
def trigger_visualization_hook(cfg: Config, show: bool = False, show_dir: Optional[str] = None,
                               wait_time: float = 2) -> Config:
    """Turn on the visualization hook: mmdet/mmrotate save to ``test_out_dir`` (relative to
    work_dir/timestamp), mmseg through ``visualizer.save_dir``."""
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError('VisualizationHook must be included in default_hooks.'
                           'refer to usage "visualization=dict(type=\'VisualizationHook\')"')
    hook = default_hooks['visualization']
    hook['draw'] = True
    if show:
        hook['show'] = True
        hook['wait_time'] = wait_time
    if show_dir:
        if get_scope(cfg) == 'mmseg':
            cfg.visualizer['save_dir'] = show_dir
        else:
            hook['test_out_dir'] = show_dir
    return cfg


def _default_det_tta(cfg: Config) -> None:
    """mmdet's defaults when the config has no tta_model / tta_pipeline: flip TTA."""
    if 'tta_model' not in cfg:
        warnings.warn('Cannot find ``tta_model`` in config, we will set it as default.')
        cfg.tta_model = dict(
            type='DetTTAModel',
            tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('Cannot find ``tta_pipeline`` in config, we will set it as default.')
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[
                [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
                [dict(type='PackDetInputs',
                      meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                 'scale_factor', 'flip', 'flip_direction'))],
            ])


def enable_tta(cfg: Config) -> None:
    """Wrap the model in ``tta_model`` and test with ``tta_pipeline``.

    mmdet fills in flip-TTA defaults; mmseg's configs define both (default_runtime +
    dataset bases); mmrotate 1.0.0rc1 has no TTA model, so its config must bring one.
    """
    scope = get_scope(cfg)
    if scope == 'mmdet':
        _default_det_tta(cfg)
    elif 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise RuntimeError(f'--tta needs `tta_model` and `tta_pipeline` in a {scope} config')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def set_out(cfg: Config, out: str) -> None:
    """mmseg: --out is a folder the IoUMetric writes prediction pngs to (its tool's way)."""
    evaluators = cfg.test_evaluator
    for evaluator in (evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]):
        evaluator['output_dir'] = out
        evaluator['keep_results'] = True


def add_dump_metric(runner: Runner, scope: str, out: str) -> None:
    """mmdet/mmrotate: --out is a pickle of all predictions (mmdet RLE-encodes masks)."""
    assert out.endswith(('.pkl', '.pickle')), 'The dump file must be a pkl file.'
    if scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults as Dump
    else:
        from mmengine.evaluator import DumpResults as Dump
    runner.test_evaluator.metrics.append(Dump(out_file_path=out))


def _peft_backbones(node) -> list:
    """Every ``type='PEFTBackbone'`` dict in a model config (also inside a TTA wrapper)."""
    return [sub for sub in config_dicts(node) if sub.get('type') == 'PEFTBackbone']


def use_checkpoint(cfg: Config, checkpoint: str) -> None:
    """What to test: a full checkpoint holds every weight, so the pretrained file is not read
    (FLoRAHook checks on load that the file does hold every tensor, finite, with its shape);
    an adapter file (``*.safetensors``) is loaded by FLoRAHook onto the pretrained base, whose
    fingerprint must match the one recorded with the adapters."""
    if not osp.exists(checkpoint):  # a file, or a DCP checkpoint directory
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    hooks = [h for h in cfg.get('custom_hooks', None) or [] if is_flora_hook(h)]
    if checkpoint.endswith('.safetensors'):
        cfg.load_from = None
        if not hooks:
            cfg.custom_hooks = list(cfg.get('custom_hooks', None) or []) + [
                dict(type='FLoRAHook', norm_interval=0)]
            hooks = cfg.custom_hooks[-1:]
        for hook in hooks:
            hook['adapter_checkpoint'] = checkpoint
        return
    cfg.load_from = checkpoint
    for backbone in _peft_backbones(cfg.model):
        backbone['load_pretrained'] = False


def test(config: str, checkpoint: str, work_dir: Optional[str] = None, out: Optional[str] = None,
         show: bool = False, show_dir: Optional[str] = None, wait_time: float = 2,
         tta: bool = False, cfg_options: Optional[dict] = None, launcher: str = 'none') -> dict:
    """Evaluate ``checkpoint`` with ``config`` as ``tools/test.py`` does; returns the metrics."""
    cfg = load_runner_config(config, cfg_options, launcher, work_dir)
    scope = get_scope(cfg)
    use_checkpoint(cfg, checkpoint)
    if show or show_dir:
        cfg = trigger_visualization_hook(cfg, show, show_dir, wait_time)
    if tta:
        enable_tta(cfg)
    if out is not None and scope == 'mmseg':
        set_out(cfg, out)
    runner = build_runner(cfg)
    if out is not None and scope != 'mmseg':
        add_dump_metric(runner, scope, out)
    with mmengine_checkpoint_globals():
        return runner.test()


# not a test function, whatever pytest's collection rules say when this is imported by a test
test.__test__ = False  # type: ignore[attr-defined]
