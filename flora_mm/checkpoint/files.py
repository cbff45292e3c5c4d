"""Checkpoint files on disk: written atomically, found again after a kill.

:class:`AtomicLocalBackend` is the file backend CheckpointHook writes through (by name,
:data:`ATOMIC_BACKEND`): each file goes to a temporary name and is renamed into place, so a
kill leaves either the old file or the new one. Files that belong to a checkpoint (the adapter
pair) are prepared under temporary names beforehand (:func:`add_companions`) and renamed right
after the checkpoint itself, or removed if it could not be written: there is never an adapter
file without its checkpoint. :func:`find_resumable_checkpoint` picks the newest checkpoint
that actually loads when ``last_checkpoint`` is empty, dangling or names a truncated file;
:func:`remove_stale_temporaries` clears what a killed save left behind.
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import re
import shutil
import threading
import zipfile
from typing import Callable

from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging import print_log

from ..utils import atomic_paths
from ..utils.fileio import TMP_PREFIX

#: name of the file backend that writes atomically (``CheckpointHook(backend_args=...)``)
ATOMIC_BACKEND = 'flora_mm_atomic_local'

_lock = threading.Lock()
_companions: dict[str, list[tuple[str, str]]] = {}


def add_companions(checkpoint_path: str, files: list[tuple[str, str]]) -> None:
    """Have (temporary, final) file pairs renamed into place right after ``checkpoint_path``
    is written through :class:`AtomicLocalBackend`, or removed if that write fails."""
    with _lock:
        _companions.setdefault(osp.abspath(checkpoint_path), []).extend(files)


def discard_companions(checkpoint_path: str) -> None:
    """Remove the temporary files still waiting for ``checkpoint_path``."""
    with _lock:
        pending = _companions.pop(osp.abspath(checkpoint_path), [])
    for tmp, _ in pending:
        if osp.exists(tmp):
            os.remove(tmp)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend whose ``put`` writes a temporary file and renames it, then
    commits the file's companions (:func:`add_companions`)."""

    def put(self, obj: bytes, filepath) -> None:
        path = os.fspath(filepath)
        try:
            with atomic_paths(path) as (tmp,):
                with open(tmp, 'wb') as f:
                    f.write(obj)
        except BaseException:
            discard_companions(path)
            raise
        commit_companions(path)


def commit_companions(checkpoint_path: str) -> None:
    """Rename the files waiting for ``checkpoint_path`` into place (it was just written)."""
    with _lock:
        pending = _companions.pop(osp.abspath(checkpoint_path), [])
    for tmp, final in pending:
        os.replace(tmp, final)


# registered under its own name only: nothing changes for code that does not ask for it
register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporary files (and DCP checkpoint directories) a killed save left in
    ``directory`` (``.tmp-*`` names); returns them. Call only where no save of this run is
    under way."""
    stale = sorted(glob.glob(osp.join(glob.escape(directory), f'{TMP_PREFIX}*')))
    for path in stale:
        if osp.isdir(path) and not osp.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif osp.isfile(path):
            os.remove(path)
    return stale


def _checkpoint_candidates(work_dir: str) -> list[str]:
    """Regular checkpoints in ``work_dir`` (files, or DCP directories of the same name), newest
    first (by epoch/iter number, then mtime)."""
    found = []
    for path in glob.glob(osp.join(glob.escape(work_dir), '*.pth')):
        match = re.fullmatch(r'(epoch|iter)_(\d+)\.pth', osp.basename(path))
        if match:
            found.append((int(match.group(2)), osp.getmtime(path), path))
    return [p for _, _, p in sorted(found, reverse=True)]


def unreadable_reason(path: str) -> str | None:
    """None if ``path`` is a complete checkpoint file, else the reason.

    torch writes a zip archive whose directory sits at the very end, so a truncated file has
    none; opening the archive reads only that directory (cheap for any checkpoint size).
    A DCP checkpoint directory: :func:`~flora_mm.checkpoint.dcp.dcp_unreadable_reason`.
    """
    if osp.isdir(path):
        from .dcp import dcp_unreadable_reason
        return dcp_unreadable_reason(path)
    if not osp.isfile(path):
        return 'no such file'
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f'not a complete checkpoint (truncated?): {err}'
    if not any(n.endswith('data.pkl') for n in names):
        return 'not a torch checkpoint (no data.pkl)'
    return None


def find_resumable_checkpoint(work_dir: str,
                              log: Callable[[str, int], None] | None = None) -> str | None:
    """The checkpoint an auto ``--resume`` should use, or None if there is none.

    ``last_checkpoint`` first; when it is empty, names a missing file, or a file that does not
    load (truncated), the newest ``epoch_N.pth`` / ``iter_N.pth`` in ``work_dir`` that loads,
    saying so through ``log(message, level)``.
    """
    def say(message: str, level: int = logging.WARNING) -> None:
        (log or (lambda m, lv: print_log(m, logger='current', level=lv)))(message, level)

    pointer = osp.join(work_dir, 'last_checkpoint')
    named = None
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip() or None
        if named is None:
            say(f'{pointer} is empty')
        else:
            reason = unreadable_reason(named)
            if reason is None:
                return named
            say(f'{pointer} names {named}, which cannot be used: {reason}')
    for path in _checkpoint_candidates(work_dir):
        if named is not None and osp.abspath(path) == osp.abspath(named):
            continue
        reason = unreadable_reason(path)
        if reason is None:
            if osp.isfile(pointer):
                say(f'resuming from the newest complete checkpoint instead: {path}')
            return path
        say(f'skipping {path}: {reason}')
    return None


def point_last_checkpoint(work_dir: str, path: str) -> None:
    """Make ``work_dir/last_checkpoint`` (mmengine's pointer file) name ``path``."""
    with atomic_paths(osp.join(work_dir, 'last_checkpoint')) as (tmp,):
        with open(tmp, 'w') as f:
            f.write(path)
