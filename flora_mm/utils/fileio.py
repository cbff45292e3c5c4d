"""Atomic writes: readers never see a half-written file or folder, and a failure leaves the
old one (or nothing) in place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: prefix of the temporary files ``atomic_paths`` writes (what a killed write leaves behind)
TMP_PREFIX = '.tmp-'


def name_the_files(err: OSError, *paths: str | os.PathLike) -> OSError:
    """``err`` again, its message naming the files that could not be written (a bare ENOSPC
    names none)."""
    if err.errno is None:
        return err
    return type(err)(err.errno, f'{err.strerror}: could not write '
                     f'{", ".join(os.fspath(p) for p in paths)}')


def temporary_beside(path: str | os.PathLike) -> str:
    """A new empty file next to ``path`` (same folder, so a rename onto ``path`` is atomic)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    return tmp


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[tuple[str, ...]]:
    """Yield one temporary path beside each of ``paths``; write them in the ``with`` block.

    On success every temporary file is renamed onto its target (together, after all writes
    succeeded); on any error all temporary files are removed and the targets stay untouched.
    An OSError (a full disk: ENOSPC) is raised again naming the target files.
    """
    tmps: list[str] = []
    try:
        for path in paths:
            tmps.append(temporary_beside(path))
        try:
            yield tuple(tmps)
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
        except OSError as err:
            raise name_the_files(err, *paths) from err
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``final``; on success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final.name}.tmp-', dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{final.name}.old-', dir=final.parent))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
