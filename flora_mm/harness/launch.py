"""How the harnesses start the tools: command lines and environment of the subprocesses.

A tool runs as a module of the package (``python -m flora_mm.cli.train ...``), never as a path
under a checkout's tools/, so the harnesses work from an installed flora_mm as well as from a
checkout. With several processes the command is what tools/dist_train.sh / dist_test.sh run
(``python -m torch.distributed.run --nnodes ... -m flora_mm.cli.train CONFIG --launcher pytorch
...``) and reads the same environment: ``NNODES``, ``NODE_RANK``, ``PORT``, ``MASTER_ADDR`` and
``PYTHON``.

The subprocesses import the same flora_mm as the process that starts them: :func:`child_env`
puts the folder this flora_mm was imported from first on ``PYTHONPATH`` unless it is an
installed one (a site-packages folder, which a fresh interpreter finds by itself).
"""
from __future__ import annotations

import os
import os.path as osp
import site
import socket
import sys
from typing import Mapping, Optional, Sequence

import flora_mm

#: the tools a harness starts, as modules (``python -m flora_mm.cli.<tool>``)
TOOL_MODULE = 'flora_mm.cli.{}'


def package_root() -> str:
    """The folder that holds the imported flora_mm package (a checkout or a site folder)."""
    return osp.dirname(osp.dirname(osp.abspath(flora_mm.__file__)))


def _site_dirs() -> set[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, 'getsitepackages') else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return {osp.realpath(d) for d in dirs}


def is_installed() -> bool:
    """Whether flora_mm comes from a site-packages folder (a fresh interpreter finds it)."""
    return osp.realpath(package_root()) in _site_dirs()


def _same_dir(a: str, b: str) -> bool:
    try:
        return osp.samefile(a, b)
    except OSError:
        return False


def child_env(env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> dict:
    """``env`` (default: this process's) for a subprocess that must import this flora_mm.

    Not installed (a checkout, an editable install's source folder, ``pip install --target``
    on ``PYTHONPATH``): its folder goes first on ``PYTHONPATH``. ``python -m`` puts the working
    folder before ``PYTHONPATH``: when ``cwd`` holds another flora_mm (another checkout),
    ``PYTHONSAFEPATH=1`` keeps it off ``sys.path`` (Python >= 3.11).
    """
    env = dict(os.environ if env is None else env)
    root = package_root()
    if not is_installed():
        paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
        paths = [root] + [p for p in paths if not _same_dir(p, root)]
        env['PYTHONPATH'] = os.pathsep.join(paths)
    if cwd is not None:
        other = osp.join(cwd, 'flora_mm')
        if osp.isdir(other) and not _same_dir(other, osp.join(root, 'flora_mm')):
            env['PYTHONSAFEPATH'] = '1'
    return env


def free_port() -> int:
    """A TCP port free on this host now, for a launch's rendezvous (the kernel picks it; it is
    released before the launcher binds it, so another process could take it in between)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tool_command(tool: str, args: Sequence[str], python: str = sys.executable, gpus: int = 1,
                 env: Optional[Mapping[str, str]] = None) -> list[str]:
    """``python -m flora_mm.cli.<tool> *args``; with ``gpus`` > 1 (train / test only) the
    torchrun command of tools/dist_<tool>.sh: ``args`` are the tool's own (CONFIG, for test
    also CHECKPOINT, then options), ``--launcher pytorch`` goes after the positionals, and
    ``NNODES``, ``NODE_RANK``, ``PORT``, ``MASTER_ADDR``, ``PYTHON`` come from ``env``
    (default: this process's) with the scripts' defaults."""
    module = TOOL_MODULE.format(tool)
    if gpus <= 1:
        return [python, '-m', module, *args]
    if tool not in ('train', 'test'):
        raise ValueError(f'only train and test run in several processes, not {tool!r}')
    env = os.environ if env is None else env
    positional = 2 if tool == 'test' else 1
    return [env.get('PYTHON') or python, '-m', 'torch.distributed.run',
            f'--nnodes={env.get("NNODES") or 1}',
            f'--node_rank={env.get("NODE_RANK") or 0}',
            f'--master_addr={env.get("MASTER_ADDR") or "127.0.0.1"}',
            f'--nproc_per_node={gpus}',
            f'--master_port={env.get("PORT") or 29500}',
            '-m', module, *args[:positional], '--launcher', 'pytorch', *args[positional:]]


def find_checkout(*required: str) -> Optional[str]:
    """A source tree holding ``required`` (e.g. ``'configs'``, ``'tests'``): the one this
    flora_mm was imported from, else the working folder; None when neither has them."""
    for root in (package_root(), os.getcwd()):
        if all(osp.isdir(osp.join(root, r)) for r in required):
            return root
    return None


__all__ = ['TOOL_MODULE', 'package_root', 'is_installed', 'child_env', 'tool_command',
           'find_checkout']
