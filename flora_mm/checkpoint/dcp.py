"""Sharded checkpoints in torch's own format (``torch.distributed.checkpoint``, DCP).

A DCP checkpoint is a directory with mmengine's checkpoint name (``iter_4.pth/``), so
``last_checkpoint``, ``max_keep_ckpts`` (mmengine's CheckpointHook removes directories, as for
DeepSpeed) and :func:`~flora_mm.checkpoint.find_resumable_checkpoint` work unchanged::

    iter_4.pth/
      .metadata          DCP's index: every tensor's shape, dtype and where its chunks are
      __<rank>_0.distcp  one file per rank: that rank's shards (model + optimizer tensors)
      extra_state.pth    everything else (meta, message hub, schedulers, random state,
                         flora_mm's entries, the optimizer's param_groups): plain values and
                         tensors, torch.save'd by rank 0, read with weights_only=True

Only tensors go through DCP: DCP stores any other value as pickled bytes and reads them back
with ``torch.load(weights_only=False)``, and its ``.metadata`` with a bare ``pickle.load``
(torch 2.14 ``FileSystemReader``): either would run code from an untrusted checkpoint.
:class:`SafeFileSystemReader` reads ``.metadata`` with an unpickler that resolves only DCP's
own metadata classes, torch dtypes / sizes / layouts, and refuses every bytes entry; the
tensor chunks themselves torch already reads with ``weights_only=True``.

Every rank writes its own shards into a temporary sibling directory; rank 0 adds
``extra_state.pth`` and renames the directory into place (:func:`write_dcp_checkpoint`), so a
checkpoint directory under its final name is always complete.
"""
from __future__ import annotations

import dataclasses
import os
import os.path as osp
import pickle
import shutil
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..utils.fileio import TMP_PREFIX, atomic_paths
from .safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint_file

#: DCP's index file (torch's name) and the file with the non-tensor state (ours)
METADATA = '.metadata'
EXTRA_STATE = 'extra_state.pth'
#: top-level keys of the tensors in DCP
MODEL_KEY, OPTIM_KEY = 'state_dict', 'optimizer'
#: key of the optimizer's param_groups (plain values) in extra_state.pth
PARAM_GROUPS_KEY = 'optimizer_param_groups'


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory (complete or not: see
    :func:`dcp_unreadable_reason`)."""
    return osp.isdir(os.fspath(path))


# --------------------------------------------------------------------------- safe reading
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a DCP ``.metadata`` pickle may name (torch 2.14 writes exactly these)."""
    from torch.distributed.checkpoint import filesystem, metadata
    allowed: dict[tuple[str, str], Any] = {}
    for name in ('Metadata', 'TensorStorageMetadata', 'BytesStorageMetadata', 'TensorProperties',
                 'ChunkStorageMetadata', 'MetadataIndex', 'StorageMeta', '_MEM_FORMAT_ENCODING'):
        if hasattr(metadata, name):
            allowed['torch.distributed.checkpoint.metadata', name] = getattr(metadata, name)
    allowed['torch.distributed.checkpoint.filesystem', '_StorageInfo'] = filesystem._StorageInfo
    allowed['torch', 'Size'] = torch.Size
    # layouts are pickled as _get_layout('torch.strided'): a lookup among torch.layout values
    allowed['torch.serialization', '_get_layout'] = torch.serialization._get_layout
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.memory_format)):
            allowed['torch', name] = value
    # checkpoint ids are recorded as paths (plain values, nothing runs)
    allowed['pathlib', 'PosixPath'] = __import__('pathlib').PosixPath
    allowed['pathlib', 'WindowsPath'] = __import__('pathlib').WindowsPath
    allowed['pathlib', 'PurePosixPath'] = __import__('pathlib').PurePosixPath
    allowed['collections', 'OrderedDict'] = __import__('collections').OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Written by hand: torch offers no restricted reader for DCP's ``.metadata`` (its own
    FileSystemReader calls ``pickle.load``, and ``weights_only`` loading does not apply to a
    plain pickle file). Only the names of :func:`_allowed_globals` resolve."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals()
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f'refusing to load {self._path}: it needs {module}.{name}, which is not one '
                'of the DCP metadata objects (unpickling arbitrary objects can run code)'
            ) from None


def read_dcp_metadata(path: str):
    """DCP's ``Metadata`` of the checkpoint directory ``path``, read safely."""
    from torch.distributed.checkpoint.metadata import Metadata
    file = osp.join(path, METADATA)
    if not osp.isfile(file):
        raise CheckpointError(f'{path} is not a complete DCP checkpoint: {METADATA} is missing '
                              '(an interrupted save, or not a checkpoint directory)')
    try:
        with open(file, 'rb') as f:
            metadata = _MetadataUnpickler(f, file).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001  (any unpickling error: a damaged file)
        raise CheckpointError(f'cannot read {file} (truncated or corrupt?): '
                              f'{type(err).__name__}: {err}') from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f'{file} is not DCP metadata ({type(metadata).__name__})')
    return metadata


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.futures import Future
    from torch.distributed.checkpoint.planner import LoadItemType

    class SafeFileSystemReader(FileSystemReader):
        """torch's FileSystemReader with ``.metadata`` read by :func:`read_dcp_metadata` and
        no pickled bytes entries (tensors only; torch reads those with weights_only=True)."""

        def read_metadata(self, *args, **kwargs):
            if kwargs.get('rank') is not None:
                raise CheckpointError(f'{self.path}: per-rank metadata is not supported')
            metadata = read_dcp_metadata(os.fspath(self.path))
            if getattr(metadata, 'storage_meta', None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    raise UnsafeCheckpointError(
                        f'refusing to load {self.path}: entry {item.dest_index.fqn} is pickled '
                        'bytes, not a tensor (flora_mm checkpoints keep only tensors in DCP)')
            # one file at a time, so that an error names the shard file it came from (torch's
            # reader reports a bare unpickling / size error)
            per_file: dict[str, list] = {}
            for item in plan.items:
                rel = self.storage_data[item.storage_index].relative_path
                per_file.setdefault(rel, []).append(item)
            for rel, items in per_file.items():
                file = osp.join(os.fspath(self.path), rel)
                if not osp.isfile(file):
                    raise CheckpointError(f'cannot read DCP checkpoint {self.path}: shard file '
                                          f'{rel} is missing')
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except CheckpointError:
                    raise
                except Exception as err:  # noqa: BLE001  (a damaged shard, any error type)
                    raise CheckpointError(
                        f'cannot read shard file {file} of DCP checkpoint {self.path} '
                        f'(corrupt or truncated?): {type(err).__name__}: {err}') from err
            fut: Future = Future()
            fut.set_result(None)
            return fut

    return SafeFileSystemReader


def safe_reader(path: str):
    """A DCP storage reader for ``path`` that never unpickles objects (see module doc)."""
    return _safe_reader_class()(path)


def dcp_unreadable_reason(path: str) -> str | None:
    """None if the directory ``path`` holds a complete DCP checkpoint, else the reason: its
    ``.metadata`` and ``extra_state.pth`` exist and load, and every shard file the metadata
    names is there and long enough (cheap: no tensor is read)."""
    if not osp.isdir(path):
        return 'no such directory'
    try:
        metadata = read_dcp_metadata(path)
    except CheckpointError as err:
        return str(err)
    if not osp.isfile(osp.join(path, EXTRA_STATE)):
        return f'not a complete checkpoint: {EXTRA_STATE} is missing'
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, 'relative_path', None)
        if rel is None:
            return 'unknown DCP storage layout'
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        file = osp.join(path, rel)
        if osp.dirname(osp.normpath(rel)) or rel.startswith('.'):
            return f'{METADATA} names a file outside the directory: {rel!r}'
        if not osp.isfile(file):
            return f'shard file {rel} is missing'
        if osp.getsize(file) < end:
            return f'shard file {rel} is truncated ({osp.getsize(file)} < {end} bytes)'
    return None


def check_dcp_checkpoint(path: str) -> None:
    """Raise, naming the problem (missing or truncated shard file, missing ``.metadata`` /
    ``extra_state.pth``, unsafe metadata), unless ``path`` is a complete DCP checkpoint."""
    if osp.isfile(osp.join(path, METADATA)):
        read_dcp_metadata(path)  # an unsafe .metadata raises UnsafeCheckpointError itself
    reason = dcp_unreadable_reason(path)
    if reason is not None:
        if reason == 'no such directory':
            raise FileNotFoundError(f'{path} can not be found.')
        raise CheckpointError(f'cannot use DCP checkpoint {path}: {reason}')



def load_dcp_extra(path: str) -> dict:
    """The non-tensor part of the DCP checkpoint ``path`` (meta, message hub, ...)."""
    extra = load_checkpoint_file(osp.join(path, EXTRA_STATE), map_location='cpu')
    if not isinstance(extra, dict):
        raise CheckpointError(f'{path}/{EXTRA_STATE} is not a dict')
    return extra


def dcp_tensor_specs(path: str, top: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor under ``top`` ('state_dict' / 'optimizer') by its key
    below ``top`` (model keys; optimizer: ``state.<param>.<name>``), from the metadata only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = read_dcp_metadata(path)
    paths = metadata.planner_data or {}
    specs = {}
    for fqn, md in metadata.state_dict_metadata.items():
        where = paths.get(fqn, tuple(fqn.split('.', 1)))
        if not where or where[0] != top:
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise UnsafeCheckpointError(f'refusing to load {path}: entry {fqn} is pickled '
                                        'bytes, not a tensor')
        specs[fqn[len(top) + 1:]] = (tuple(md.size), md.properties.dtype)
    return specs


def dcp_key_paths(path: str) -> set[tuple[str, ...]]:
    """The key path of every entry of the checkpoint (``('state_dict', name)``,
    ``('optimizer', 'state', name, 'exp_avg')``), from the metadata only."""
    metadata = read_dcp_metadata(path)
    paths = metadata.planner_data or {}
    return {tuple(paths.get(fqn, tuple(fqn.split('.', 1))))
            for fqn in metadata.state_dict_metadata}


def _nested_empty(path: str) -> dict:
    """A nested state dict of empty CPU tensors shaped like everything in the checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = read_dcp_metadata(path)
    paths = metadata.planner_data or {}
    nested: dict = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise UnsafeCheckpointError(f'refusing to load {path}: entry {fqn} is pickled '
                                        'bytes, not a tensor')
        where = paths.get(fqn)
        if not where:
            raise CheckpointError(f'{path}: no key path for {fqn} in {METADATA} (not written by '
                                  'flora_mm?)')
        node = nested
        for part in where[:-1]:
            node = node.setdefault(part, {})
        node[where[-1]] = torch.empty(md.size, dtype=md.properties.dtype)
    return nested


def load_dcp_checkpoint(path: str, map_location: Any = 'cpu') -> dict:
    """The whole DCP checkpoint ``path`` as one mmengine checkpoint dict in this process
    (``state_dict`` with full tensors, ``optimizer`` keyed by parameter names, as the gathered
    format): what tools/test.py, tools/merge_adapters.py and an unsharded run read. Needs no
    process group. Holds the full model in memory (the tools do anyway)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = osp.expanduser(os.fspath(path))
    check_dcp_checkpoint(path)
    extra = load_dcp_extra(path)
    tensors = _nested_empty(path)
    try:
        dcp.load(tensors, storage_reader=safe_reader(path), no_dist=True)
    except (Exception, CheckpointException) as err:  # noqa: BLE001  (DCP wraps errors)
        raise _read_error(path, err) from err
    checkpoint = dict(extra)
    param_groups = checkpoint.pop(PARAM_GROUPS_KEY, None)
    checkpoint[MODEL_KEY] = tensors.get(MODEL_KEY, {})
    if OPTIM_KEY in tensors or param_groups is not None:
        checkpoint[OPTIM_KEY] = dict(state=tensors.get(OPTIM_KEY, {}).get('state', {}),
                                     param_groups=param_groups or [])
    if map_location not in (None, 'cpu', torch.device('cpu')):
        from mmengine.utils import apply_to
        checkpoint = apply_to(checkpoint, torch.is_tensor, lambda t: t.to(map_location))
    return checkpoint


def load_dcp_into(path: str, state: dict) -> None:
    """``dcp.load`` into ``state`` (a nested dict of this rank's tensors / DTensors: resharded
    to the current world size by DCP), with :class:`SafeFileSystemReader`; collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.load(state, storage_reader=safe_reader(path))
    except (Exception, CheckpointException) as err:  # noqa: BLE001  (DCP wraps errors)
        raise _read_error(path, err) from err


def _read_error(path: str, err: BaseException) -> CheckpointError:
    """The error to raise for a failed ``dcp.load``: DCP gathers each rank's exception into
    one ``CheckpointException``; the first of ours (it names the shard file) is raised as it
    is, with the rank that hit it, on every rank."""
    if isinstance(err, CheckpointError):
        return err
    failures = getattr(err, 'failures', None) or {}
    for rank, failure in sorted(failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, CheckpointError):
            return type(exc)(f'{exc} (read by rank {rank})')
    first = next(iter(sorted(failures.items())), None)
    if first is not None:
        exc = first[1][0] if isinstance(first[1], tuple) else first[1]
        return CheckpointError(f'cannot read DCP checkpoint {path} (rank {first[0]}): '
                               f'{type(exc).__name__}: {exc}')
    return CheckpointError(f'cannot read DCP checkpoint {path}: {type(err).__name__}: {err}')


# --------------------------------------------------------------------------- writing
def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _broadcast(value: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replace_dir(tmp: str, final: str) -> None:
    """Rename the directory ``tmp`` onto ``final`` (a file or directory there is replaced;
    between the two renames neither name is half-written)."""
    old = None
    if osp.lexists(final):
        old = tempfile.mkdtemp(dir=osp.dirname(final), prefix=TMP_PREFIX,
                               suffix='-old-' + osp.basename(final))
        os.rename(final, osp.join(old, osp.basename(final)))
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dcp_checkpoint(path: str, tensors: dict, extra: dict,
                         on_commit: Callable[[str], None] | None = None,
                         on_failure: Callable[[str], None] | None = None) -> None:
    """Write a DCP checkpoint directory at ``path``; every rank calls it (collective).

    ``tensors``: ``{'state_dict': ..., 'optimizer': {'state': ...}}`` of this rank (DTensors:
    each rank writes only its own shards, straight from their storage; no rank gathers; plain
    tensors are written by rank 0).
    ``extra``: the plain non-tensor state, written by rank 0. Everything goes into a temporary
    sibling directory (``.tmp-*``, cleared by ``remove_stale_temporaries`` after a kill), which
    rank 0 renames onto ``path`` when all ranks are done; ``on_commit(path)`` runs on rank 0
    right after (the adapter files), ``on_failure(path)`` if anything failed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException
    path = osp.abspath(os.fspath(path))
    tmp = None
    if _is_main():
        try:
            os.makedirs(osp.dirname(path), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=osp.dirname(path), prefix=TMP_PREFIX,
                                   suffix='-' + osp.basename(path))
        except OSError as err:  # named on every rank (they would wait for the name)
            tmp = OSError(err.errno, f'{err.strerror}: could not create a directory beside '
                                     f'{path}')
    tmp = _broadcast(tmp)
    if isinstance(tmp, OSError):
        if _is_main() and on_failure is not None:
            on_failure(path)
        raise CheckpointError(f'could not write DCP checkpoint {path}: {tmp}')
    try:
        # thread_count=1: one tensor in flight at a time (CPU shards are written from their
        # own storage; CUDA ones through a bounded copy-ahead buffer, torch's default 10 MB)
        try:
            # a plain tensor (a buffer such as BN's running stats, which FSDP does not shard
            # nor keep equal across ranks; an optimizer step) is written once, by rank 0: the
            # values the gathered format saves (DCP's default picks the least loaded rank)
            dcp.save(tensors, storage_writer=FileSystemWriter(tmp, thread_count=1),
                     planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        except CheckpointException as err:  # a BaseException: every rank gets it
            first = next(iter(sorted(err.failures.items())), None)
            what = (f'rank {first[0]}: {type(first[1][0]).__name__}: {first[1][0]}'
                    if first else str(err))
            raise CheckpointError(f'could not write DCP checkpoint {path} ({what})') from err
        failed = None
        if _is_main():
            try:
                torch.save(extra, osp.join(tmp, EXTRA_STATE))
                replace_dir(tmp, path)
            except BaseException as err:  # noqa: BLE001  (reported to every rank below)
                failed = f'{type(err).__name__}: {err}'
        failed = _broadcast(failed)
        if failed is not None:
            raise CheckpointError(f'could not write DCP checkpoint {path}: {failed}')
    except BaseException:
        if _is_main():
            if osp.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            if on_failure is not None:
                on_failure(path)
        raise
    if _is_main() and on_commit is not None:
        on_commit(path)


# --------------------------------------------------------------------------- conversion
def dcp_to_file(src: str, dst: str, force: bool = False) -> dict:
    """Write the DCP checkpoint directory ``src`` as one ordinary mmengine checkpoint file
    ``dst``: the same dict the gathered format (``save_format='full'``) writes (full tensors,
    the optimizer state keyed by parameter names), for code that reads files only (vanilla
    mmdet / mmseg / mmrotate, ``torch.load``). Read in this process (no process group; the
    whole model in memory), written atomically (a temporary file renamed onto ``dst``: a
    failure leaves no partial file). Returns the checkpoint written."""
    src = osp.expanduser(os.fspath(src))
    dst = osp.expanduser(os.fspath(dst))
    if not osp.isdir(src):
        raise FileNotFoundError(f'{src} is not a DCP checkpoint directory'
                                + ('' if osp.exists(src) else ' (it does not exist)'))
    if osp.isdir(dst):
        raise IsADirectoryError(f'{dst} is a directory: give the path of the file to write')
    if osp.lexists(dst) and not force:
        raise FileExistsError(f'{dst} exists (use force=True / --force to replace it)')
    if osp.abspath(dst) == osp.abspath(src):
        raise ValueError('the output must be another path than the checkpoint directory')
    checkpoint = load_dcp_checkpoint(src)
    with atomic_paths(dst) as (tmp,):
        torch.save(checkpoint, tmp)
    return checkpoint
