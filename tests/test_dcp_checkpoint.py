"""DCP checkpoint directories (flora_mm.checkpoint.dcp) in one process: written atomically,
read back whole (the gathered format), refused when incomplete or when its metadata would
unpickle other objects; the peak-RSS helper."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from flora_mm.checkpoint import (CheckpointError, UnsafeCheckpointError, find_resumable_checkpoint,
                                 load_checkpoint_file, load_checkpoint_meta,
                                 remove_stale_temporaries, unreadable_reason,
                                 write_dcp_checkpoint)
from flora_mm.checkpoint.dcp import EXTRA_STATE, METADATA, PARAM_GROUPS_KEY


def _write(path):
    tensors = {'state_dict': {'a.weight': torch.randn(4, 3), 'b': torch.arange(5)},
               'optimizer': {'state': {'a.weight': {'step': torch.tensor(3.),
                                                    'exp_avg': torch.randn(4, 3)}}}}
    extra = {'meta': {'epoch': 0, 'iter': 4, 'seed': 7},
             PARAM_GROUPS_KEY: [{'lr': 0.1, 'params': ['a.weight']}]}
    committed = []
    write_dcp_checkpoint(str(path), tensors, extra, on_commit=committed.append)
    assert committed == [os.path.abspath(path)]
    return tensors


def test_dcp_roundtrip_and_errors(tmp_path):
    work = tmp_path / 'work'
    ckpt = work / 'iter_4.pth'
    tensors = _write(ckpt)
    assert ckpt.is_dir() and not [p for p in os.listdir(work) if p.startswith('.tmp-')]
    assert unreadable_reason(str(ckpt)) is None
    loaded = load_checkpoint_file(str(ckpt))
    for k, v in tensors['state_dict'].items():
        assert torch.equal(loaded['state_dict'][k], v)
    assert torch.equal(loaded['optimizer']['state']['a.weight']['exp_avg'],
                       tensors['optimizer']['state']['a.weight']['exp_avg'])
    assert loaded['optimizer']['param_groups'] == [{'lr': 0.1, 'params': ['a.weight']}]
    assert load_checkpoint_meta(str(ckpt))['seed'] == 7
    (work / 'last_checkpoint').write_text(str(ckpt))
    assert find_resumable_checkpoint(str(work)) == str(ckpt)
    # rewriting the same step replaces the directory
    _write(ckpt)
    assert unreadable_reason(str(ckpt)) is None

    # a truncated shard, a missing .metadata / extra state: named, and auto-resume skips it
    bad = work / 'iter_6.pth'
    _write(bad)
    shard = next(p for p in bad.iterdir() if p.suffix == '.distcp')
    shard.write_bytes(shard.read_bytes()[:10])
    assert 'truncated' in unreadable_reason(str(bad))
    with pytest.raises(CheckpointError, match='truncated'):
        load_checkpoint_file(str(bad))
    (work / 'last_checkpoint').write_text(str(bad))
    assert find_resumable_checkpoint(str(work)) == str(ckpt)
    (bad / METADATA).unlink()
    with pytest.raises(CheckpointError, match=r'\.metadata is missing'):
        load_checkpoint_file(str(bad))
    _write(bad)
    (bad / EXTRA_STATE).unlink()
    assert 'extra_state.pth is missing' in unreadable_reason(str(bad))

    # a .metadata that names another global is refused before anything runs
    evil = work / 'iter_8.pth'
    _write(evil)

    class Boom:
        def __reduce__(self):
            return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
    (evil / METADATA).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafeCheckpointError, match='posix.system|os.system'):
        load_checkpoint_file(str(evil))
    assert not (tmp_path / 'pwned').exists()

    # what a killed save leaves is cleared
    (work / '.tmp-xyz-iter_10.pth').mkdir()
    assert remove_stale_temporaries(str(work))
    assert not (work / '.tmp-xyz-iter_10.pth').exists()


def test_resume_seed_read_from_a_dcp_directory(tmp_path):
    from mmengine.config import Config

    from flora_mm.apis.runner import restore_run_seed
    _write(tmp_path / 'iter_4.pth')
    cfg = Config(dict(resume=True, load_from=str(tmp_path / 'iter_4.pth'), work_dir=str(tmp_path)))
    restore_run_seed(cfg)
    assert cfg.randomness['seed'] == 7
