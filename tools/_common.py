"""Code shared by tools/train.py and tools/test.py.

One pair of tools serves mmdet, mmseg and mmrotate configs: the config's ``default_scope``
picks the package whose modules get registered and whose conventions (visualization, ``--out``,
``--tta``) apply. Everything else follows the packages' own tools/train.py and tools/test.py
(mmdet 3.1.0 flavour, which is a superset of the mmseg 1.2.2 and mmrotate 1.0.0rc1 ones).

On top of those tools: when CUDA is unavailable, distributed runs use gloo on the CPU
(``env_cfg.dist_cfg.backend`` nccl -> gloo, SyncBN -> BN, DDP without device ids).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy
from typing import Any, Optional, Sequence

# tools/ is sys.path[0] when a tool runs; make the checkout importable without installation
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

import flora_mm  # noqa: E402,F401  (compat shims + registration, before any OpenMMLab import)
from flora_mm.utils import SCOPES, register_task_modules  # noqa: E402

import torch  # noqa: E402
from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
_CFG_OPTIONS_HELP = (
    'override some settings in the used config, the key-value pair in xxx=yyy format will be '
    'merged into config file. If the value to be overwritten is a list, it should be like '
    'key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
    'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white space '
    'is allowed.')


# --------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--cfg-options, --launcher and --local-rank/--local_rank, as in the packages' tools."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help=_CFG_OPTIONS_HELP)
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank (older);
    # torchrun passes neither and sets LOCAL_RANK instead.
    parser.add_argument('--local-rank', '--local_rank', dest='local_rank', type=int, default=0)


def parse_with_local_rank(parser: argparse.ArgumentParser,
                          argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse; export LOCAL_RANK from --local-rank unless the launcher already set the env."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


# --------------------------------------------------------------------------- config
def get_scope(cfg: Config) -> str:
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'config default_scope must be one of {SCOPES}, got {scope!r}')
    return scope


def register_scope(scope: str) -> None:
    """Register the scope's modules; the runner initialises the default scope."""
    register_task_modules(scope)


def setup_dynamo(scope: str) -> None:
    """mmdet's DYNAMO_CACHE_SIZE_LIMIT handling (its tools call it first thing)."""
    if scope in ('mmdet', 'mmrotate'):
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()


def default_work_dir(config_path: str) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def load_config(args: argparse.Namespace) -> Config:
    """Config.fromfile + launcher + --cfg-options + work_dir (CLI > config > file name)."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
        if 'custom_imports' in args.cfg_options:
            # mmengine imports custom modules only while reading a config file
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(args.config)
    return cfg


def _replace_sync_bn(node: Any) -> int:
    """Turn every ``type='SyncBN'``/``'MMSyncBN'`` into ``'BN'`` in place; returns the count."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def adapt_to_cpu_distributed(cfg: Config) -> bool:
    """Make a distributed run work without CUDA; returns whether anything changed.

    - ``env_cfg.dist_cfg.backend``: nccl needs CUDA, gloo runs on the CPU;
    - SyncBatchNorm refuses CPU tensors in distributed mode: use BN;
    - mmengine wraps the model in DDP with ``device_ids=[LOCAL_RANK]``, which DDP rejects for
      a CPU module: give an explicit ``device_ids=None``.
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available():
        return False
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env_cfg.setdefault('dist_cfg', ConfigDict())
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
        print_log('CUDA is not available: distributed backend nccl -> gloo', logger='current',
                  level=logging.WARNING)
    if _replace_sync_bn(cfg.get('model', {})):
        print_log('CUDA is not available: SyncBN -> BN', logger='current',
                  level=logging.WARNING)
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = ConfigDict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') in (
            'MMDistributedDataParallel', 'DistributedDataParallel'):
        wrapper.setdefault('device_ids', None)
    return True


def init_cpu_process_group(cfg: Config) -> None:
    """Initialise gloo for the pytorch launcher without CUDA, before the runner does.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device(LOCAL_RANK)`` first, which fails
    without a GPU; the runner skips ``init_dist`` when a process group already exists.
    """
    import torch.distributed as dist
    if (cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available()
            or not dist.is_available() or dist.is_initialized()):
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', 'gloo')
    timeout = dist_cfg.pop('timeout', None)
    if timeout is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, **dist_cfg)


def build_runner(cfg: Config) -> Runner:
    """The default Runner, or ``runner_type`` from the registry when the config names one."""
    adapt_to_cpu_distributed(cfg)
    init_cpu_process_group(cfg)
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


# --------------------------------------------------------------------------- train
def enable_amp(cfg: Config) -> None:
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
    """--resume (no value): latest checkpoint of work_dir; --resume PATH: that checkpoint."""
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


# --------------------------------------------------------------------------- test
def trigger_visualization_hook(cfg: Config, args: argparse.Namespace) -> Config:
    """Turn on the visualization hook: mmdet/mmrotate save to ``test_out_dir`` (relative to
    work_dir/timestamp), mmseg through ``visualizer.save_dir``."""
    default_hooks = cfg.default_hooks
    if 'visualization' not in default_hooks:
        raise RuntimeError('VisualizationHook must be included in default_hooks.'
                           'refer to usage "visualization=dict(type=\'VisualizationHook\')"')
    hook = default_hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if get_scope(cfg) == 'mmseg':
            cfg.visualizer['save_dir'] = args.show_dir
        else:
            hook['test_out_dir'] = args.show_dir
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
