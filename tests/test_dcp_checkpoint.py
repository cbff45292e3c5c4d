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


def test_damaged_shard_is_named(tmp_path):
    """A shard file of the right size whose bytes do not parse: the error names the file."""
    ckpt = tmp_path / 'iter_4.pth'
    _write(ckpt)
    shard = next(p for p in ckpt.iterdir() if p.suffix == '.distcp')
    shard.write_bytes(b'\x00' * shard.stat().st_size)
    assert unreadable_reason(str(ckpt)) is None  # only reading it shows it
    with pytest.raises(CheckpointError, match=rf'cannot read shard file .*{shard.name} of DCP '
                                              r'checkpoint .* \(corrupt or truncated\?\)'):
        load_checkpoint_file(str(ckpt))


def test_dcp_to_file_writes_the_gathered_dict_atomically(tmp_path):
    from flora_mm.checkpoint import dcp_to_file
    ckpt = tmp_path / 'iter_4.pth'
    tensors = _write(ckpt)
    out = tmp_path / 'out' / 'iter_4_full.pth'
    dcp_to_file(str(ckpt), str(out))
    written = torch.load(out, weights_only=True)  # an ordinary checkpoint file
    assert written.keys() == {'meta', 'state_dict', 'optimizer'}
    for key, value in tensors['state_dict'].items():
        assert torch.equal(written['state_dict'][key], value)
    assert torch.equal(written['optimizer']['state']['a.weight']['exp_avg'],
                       tensors['optimizer']['state']['a.weight']['exp_avg'])
    assert written['optimizer']['param_groups'] == [{'lr': 0.1, 'params': ['a.weight']}]
    assert written['meta']['iter'] == 4
    with pytest.raises(FileExistsError, match='exists'):
        dcp_to_file(str(ckpt), str(out))
    dcp_to_file(str(ckpt), str(out), force=True)
    # a damaged directory: an error naming it, and no file (not even a temporary one) left
    bad = tmp_path / 'iter_6.pth'
    _write(bad)
    next(p for p in bad.iterdir() if p.suffix == '.distcp').unlink()
    with pytest.raises(CheckpointError, match='shard file __0_0.distcp is missing'):
        dcp_to_file(str(bad), str(tmp_path / 'out' / 'iter_6_full.pth'))
    assert sorted(os.listdir(tmp_path / 'out')) == ['iter_4_full.pth']
