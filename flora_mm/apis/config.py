"""Reading a config the way the tools do, and fitting a distributed run to a CPU-only machine.

One pair of tools serves mmdet, mmseg and mmrotate configs: the config's ``default_scope``
picks the package whose modules get registered and whose conventions apply. When CUDA is
unavailable, distributed runs use gloo on the CPU (``env_cfg.dist_cfg.backend`` nccl -> gloo,
SyncBN -> BN, DDP without device ids).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import os.path as osp
from typing import Any, Optional, Sequence

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from ..utils import SCOPES, config_dicts, register_task_modules

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
CFG_OPTIONS_HELP = (
    'override some settings in the used config, the key-value pair in xxx=yyy format will be '
    'merged into config file. If the value to be overwritten is a list, it should be like '
    'key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
    'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white space '
    'is allowed.')


# --------------------------------------------------------------------------- arguments
def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """--cfg-options, --launcher and --local-rank/--local_rank, as in the packages' tools."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help=CFG_OPTIONS_HELP)
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
    """The config's ``default_scope``, which must name mmdet, mmseg or mmrotate."""
    scope = cfg.get('default_scope', None)
    if scope not in SCOPES:
        raise ValueError(f'config default_scope must be one of {SCOPES}, got {scope!r}')
    return scope


def load_config(config: str | Config, cfg_options: Optional[dict] = None) -> Config:
    """Config.fromfile (or a copy of a loaded Config) + --cfg-options, its package registered.

    Sets nothing the user did not ask for (no launcher, no work_dir): merge_adapters writes the
    config back. ``custom_imports`` given in ``cfg_options`` are imported too (mmengine itself
    imports them only while reading a file).
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    else:
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
        if 'custom_imports' in cfg_options:
            from mmengine.utils import import_modules_from_strings
            import_modules_from_strings(**cfg.custom_imports)
    register_task_modules(get_scope(cfg))
    return cfg


def default_work_dir(config_path: str) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def load_runner_config(config: str, cfg_options: Optional[dict] = None,
                       launcher: str = 'none', work_dir: Optional[str] = None) -> Config:
    """``load_config`` + launcher + work_dir (CLI > config > config file name) + mmdet's
    dynamo cache limit, as the packages' train/test tools set them up."""
    cfg = load_config(config, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(config)
    if get_scope(cfg) in ('mmdet', 'mmrotate'):
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    return cfg


# --------------------------------------------------------------------------- CPU distributed
def replace_sync_bn(node: Any) -> int:
    """Turn every ``type='SyncBN'``/``'MMSyncBN'`` into ``'BN'`` in place; returns the count.

    SyncBatchNorm needs CUDA in distributed mode and a process group at all."""
    count = 0
    for sub in config_dicts(node):
        if sub.get('type') in ('SyncBN', 'MMSyncBN'):
            sub['type'] = 'BN'
            count += 1
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
    if replace_sync_bn(cfg.get('model', {})):
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


SLURM_VARIABLES = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')


def slurm_environment(port: Optional[int] = None) -> dict:
    """The torch.distributed environment of one slurm task, by mmengine's rules
    (``mmengine.dist.utils._init_dist_slurm``), exported to ``os.environ`` and returned.

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID (else RANK);
    MASTER_PORT: ``port`` (``env_cfg.dist_cfg.port``), else the environment's, else 29500;
    MASTER_ADDR: the environment's, else the first host of ``scontrol show hostname
    $SLURM_NODELIST``. Missing variables or a failing ``scontrol`` are errors that name them.
    """
    import subprocess
    missing = [v for v in SLURM_VARIABLES if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f'--launcher slurm: {", ".join(missing)} not set; start the tool '
                           'inside a slurm job step (srun, e.g. tools/slurm_train.sh)')
    proc_id = int(os.environ['SLURM_PROCID'])
    ntasks = int(os.environ['SLURM_NTASKS'])
    local_rank = int(os.environ.get('SLURM_LOCALID', proc_id))
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    else:
        os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        node_list = os.environ['SLURM_NODELIST']
        try:
            out = subprocess.run(['scontrol', 'show', 'hostname', node_list],
                                 capture_output=True, text=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f'--launcher slurm: `scontrol show hostname {node_list}` failed '
                               f'({exc}); set MASTER_ADDR to the first node\'s address') from exc
        hosts = out.stdout.split()
        if not hosts:
            raise RuntimeError(f'--launcher slurm: `scontrol show hostname {node_list}` named '
                               'no host; set MASTER_ADDR to the first node\'s address')
        os.environ['MASTER_ADDR'] = hosts[0]
    os.environ['WORLD_SIZE'] = str(ntasks)
    os.environ['LOCAL_RANK'] = str(local_rank)
    os.environ['RANK'] = str(proc_id)
    return {k: os.environ[k] for k in ('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK',
                                       'LOCAL_RANK')}


def init_cpu_process_group(cfg: Config) -> None:
    """Initialise gloo for the pytorch or slurm launcher without CUDA, before the runner does.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device(LOCAL_RANK)`` first (both
    launchers), which fails without a GPU; the runner skips ``init_dist`` when a process group
    already exists. Under slurm the environment is set up as mmengine does it
    (``slurm_environment``) and the group starts from it (``env://``).
    """
    import torch.distributed as dist
    launcher = cfg.get('launcher', 'none')
    if (launcher not in ('pytorch', 'slurm') or torch.cuda.is_available()
            or not dist.is_available() or dist.is_initialized()):
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', 'gloo')
    port = dist_cfg.pop('port', None)
    if launcher == 'slurm':
        slurm_environment(port)
    timeout = dist_cfg.pop('timeout', None)
    if timeout is not None:
        dist_cfg['timeout'] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, **dist_cfg)


def leave_process_group() -> None:
    """End a distributed tool run together: barrier, then destroy the process group.

    A gloo rank that exits while another still holds the connection aborted now and then
    ("terminate called without an active exception", rc -6)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
