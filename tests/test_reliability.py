"""Issue 8: no code runs from a checkpoint, no silent wrong result, nothing lost on a crash.

Real mmengine Runners on a tiny ConvNeXt-V2-atto model (tests/_tiny_runner.py); the exact-resume
test runs real processes and kills one with a real SIGKILL.
"""
import glob
import os
import os.path as osp
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from safetensors.torch import load_file

import flora_mm  # noqa: F401
from flora_mm.checkpoint import (CheckpointError, UnsafeCheckpointError,
                                 find_resumable_checkpoint, load_checkpoint_file,
                                 mmengine_checkpoint_globals, mmengine_safe_globals)
from flora_mm.peft import PEFTConfigError, inject_adapters
from flora_mm.peft.io import load_adapter_checkpoint

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import _tiny_runner as tiny  # noqa: E402

RUNNER = osp.join(osp.dirname(osp.abspath(__file__)), '_tiny_runner.py')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class GetattrPayload:
    """Reaches for a dunder through ``builtins.getattr`` (the door to everything else)."""

    def __reduce__(self):
        import numpy as np
        return getattr, (np.dtype, '__subclasses__')


def malicious_checkpoint(path, marker):
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': {'evil': Payload(marker)}}, path)
    return str(path)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('pre') / 'convnextv2_atto.pth')
    tiny.write_pretrained(path)
    return path


@pytest.fixture(scope='module')
def trained(pretrained, tmp_path_factory):
    """One 6-iteration run with FLoRAHook: checkpoints at 2, 4, 6."""
    work = str(tmp_path_factory.mktemp('run'))
    Runner.from_cfg(tiny.make_cfg(work, pretrained)).train()
    return work


# ------------------------------------------------------------------------- 1. safe loading
def test_flora_checkpoints_are_plain_and_hold_rng_and_methods(trained):
    ckpt = osp.join(trained, 'iter_6.pth')
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    data = torch.load(ckpt, weights_only=True)  # torch's bare loader, no allow-list
    info = data['flora_mm']
    assert info['methods']['backbone']['type'] == 'FLoRA'
    assert set(info['rng']) == {'python', 'numpy', 'torch', 'cuda'}
    assert info['adapter'] == 'iter_6_adapter.safetensors'


def test_malicious_file_refused_on_every_path(pretrained, trained, tmp_path):
    marker = tmp_path / 'PWNED'
    evil = malicious_checkpoint(tmp_path / 'evil.pth', marker)
    # mmengine's loader as registered by flora_mm, with and without the mmengine allow-list
    for ctx in (None, mmengine_checkpoint_globals()):
        with pytest.raises(UnsafeCheckpointError, match=r'evil\.pth.*(posix|os)\.system'):
            if ctx is None:
                CheckpointLoader.load_checkpoint(evil, map_location='cpu')
            else:
                with ctx:
                    CheckpointLoader.load_checkpoint(evil, map_location='cpu')
    # load_from, --resume PATH and auto --resume through a Runner
    for i, kwargs in enumerate([dict(load_from=evil), dict(load_from=evil, resume=True)]):
        cfg = tiny.make_cfg(str(tmp_path / f'w{i}'), pretrained, max_iters=2, val=False)
        cfg.update(kwargs)
        with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
            Runner.from_cfg(cfg).train()
    work = tmp_path / 'auto'
    work.mkdir()
    evil_auto = malicious_checkpoint(work / 'iter_2.pth', marker)
    (work / 'last_checkpoint').write_text(evil_auto)
    cfg = tiny.make_cfg(str(work), pretrained, max_iters=2, val=False)
    cfg.resume = True
    with pytest.raises(UnsafeCheckpointError, match='iter_2.pth'):
        Runner.from_cfg(cfg).train()
    # the pretrained file (read by PEFTBackbone while the Runner builds the model)
    with pytest.raises(Exception, match=r'refusing to load .*evil\.pth'):
        Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'pre'), evil, max_iters=2, val=False))
    # the checkpoint of a test run
    cfg = tiny.make_cfg(str(tmp_path / 'test'), pretrained, val=False)
    cfg.load_from = evil
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        Runner.from_cfg(cfg).test()
    assert not marker.exists()


def test_allow_list_is_scoped(tmp_path):
    """Importing flora_mm adds nothing to torch's allow-list; the context adds it only inside."""
    from mmengine.logging import HistoryBuffer
    before = list(torch.serialization.get_safe_globals())
    assert HistoryBuffer not in before
    with mmengine_checkpoint_globals():
        assert HistoryBuffer in torch.serialization.get_safe_globals()
    after = torch.serialization.get_safe_globals()  # torch may add its own entries lazily
    ours = [g[0] if isinstance(g, tuple) else g for g in mmengine_safe_globals()]
    assert not [g for g in after if (g[0] if isinstance(g, tuple) else g) in ours]
    assert not [g for g in before if (g[0] if isinstance(g, tuple) else g) in ours]
    # a file of plain tensors loads through mmengine's loader exactly as with torch's
    torch.save({'w': torch.arange(3.)}, tmp_path / 'plain.pth')
    loaded = CheckpointLoader.load_checkpoint(str(tmp_path / 'plain.pth'), map_location='cpu')
    assert torch.equal(loaded['w'], torch.arange(3.))


def test_getattr_is_limited(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'x': GetattrPayload()}, path)
    with mmengine_checkpoint_globals():
        with pytest.raises(UnsafeCheckpointError, match=r'getattr.*__subclasses__'):
            load_checkpoint_file(str(path))


def test_plain_mmengine_checkpoint_needs_the_scoped_allow_list(pretrained, tmp_path):
    """A checkpoint written by mmengine without FLoRAHook (numpy, HistoryBuffer, ...): refused
    by the bare loader, naming the file; loaded inside mmengine_checkpoint_globals(), where a
    resume from it works."""
    work = str(tmp_path / 'plain')
    cfg = tiny.make_cfg(work, pretrained, max_iters=2, val=False)
    cfg.custom_hooks = []
    Runner.from_cfg(cfg).train()
    ckpt = osp.join(work, 'iter_2.pth')
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    with pytest.raises(UnsafeCheckpointError, match='iter_2.pth'):
        CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    with mmengine_checkpoint_globals():
        loaded = CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
        assert loaded['meta']['iter'] == 2
        cfg = tiny.make_cfg(str(tmp_path / 'resumed'), pretrained, max_iters=4, val=False)
        cfg.update(load_from=ckpt, resume=True, custom_hooks=[])  # as it was written
        runner = Runner.from_cfg(cfg)
        runner.train()
    assert runner.iter == 4
    # and outside the block, the allow-list is gone again
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(ckpt)


def test_corrupt_and_truncated_files_are_named(pretrained, trained, tmp_path):
    data = open(osp.join(trained, 'iter_6.pth'), 'rb').read()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.pth'):
        load_checkpoint_file(str(cut))
    adapter = open(osp.join(trained, 'iter_6_adapter.safetensors'), 'rb').read()
    bad = tmp_path / 'x_adapter.safetensors'
    bad.write_bytes(adapter[:len(adapter) // 2])
    (tmp_path / 'x_adapter.json').write_bytes(
        open(osp.join(trained, 'iter_6_adapter.json'), 'rb').read())
    model = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'm'), pretrained)).model
    with pytest.raises(ValueError, match='x_adapter.safetensors'):
        load_adapter_checkpoint(model, str(bad))


# ------------------------------------------------------------------------- 2. non-finite loss
def test_nan_loss_stops_the_run_and_keeps_the_last_good_files(pretrained, tmp_path):
    work = str(tmp_path)
    # shuffle off: batch 4 (images 12..15 of 16 would be NaN) -> iterations 1-3 are finite
    cfg = tiny.make_cfg(work, pretrained, max_iters=6, val=False, nan_from=8)
    cfg.train_dataloader.sampler.shuffle = False
    with pytest.raises(RuntimeError, match=r'non-finite loss at iteration 3 .*loss_cls=nan'):
        Runner.from_cfg(cfg).train()
    files = sorted(f for f in os.listdir(work) if f.endswith(('.pth', '.safetensors')))
    assert files == ['iter_2.pth', 'iter_2_adapter.safetensors'], files
    state = torch.load(osp.join(work, 'iter_2.pth'), weights_only=True)['state_dict']
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_huge_learning_rate_stops_at_the_second_iteration(pretrained, tmp_path):
    """The issue's case: lr=1e6 makes the loss NaN from iteration 2 on."""
    cfg = tiny.make_cfg(str(tmp_path), pretrained, max_iters=6, val=False, lr=1e6)
    with pytest.raises(RuntimeError, match=r'non-finite loss at iteration 2 .*loss=nan'):
        Runner.from_cfg(cfg).train()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(('.pth', '.safetensors'))]


# ------------------------------------------------------------------------- 3. one unit
def test_adapter_file_holds_the_checkpoint_state(trained):
    for it in (2, 4, 6):
        state = torch.load(osp.join(trained, f'iter_{it}.pth'), weights_only=True)['state_dict']
        adapter = load_file(osp.join(trained, f'iter_{it}_adapter.safetensors'))
        assert adapter and any('flora_core' in k for k in adapter)
        for key, value in adapter.items():
            assert torch.equal(value, state[key]), (it, key)
    assert not glob.glob(osp.join(trained, '.tmp-*'))


def test_auto_resume_falls_back_to_the_newest_complete_checkpoint(pretrained, trained,
                                                                   tmp_path):
    work = tmp_path / 'w'
    work.mkdir()
    for it in (2, 4):
        (work / f'iter_{it}.pth').write_bytes(open(osp.join(trained, f'iter_{it}.pth'),
                                                   'rb').read())
    data = (work / 'iter_4.pth').read_bytes()
    (work / 'iter_4.pth').write_bytes(data[:len(data) - 100])  # truncated
    messages = []
    log = lambda message, level: messages.append(message)  # noqa: E731
    (work / 'last_checkpoint').write_text(str(work / 'iter_4.pth'))
    assert find_resumable_checkpoint(str(work), log) == str(work / 'iter_2.pth')
    assert any('iter_4.pth' in m and 'truncated' in m for m in messages)
    assert any('newest complete checkpoint' in m for m in messages)
    (work / 'last_checkpoint').write_text('')  # killed while mmengine wrote it
    assert find_resumable_checkpoint(str(work), log) == str(work / 'iter_2.pth')
    (work / 'last_checkpoint').write_text(str(work / 'gone.pth'))  # dangling
    assert find_resumable_checkpoint(str(work), log) == str(work / 'iter_2.pth')
    os.remove(work / 'iter_2.pth')  # nothing complete left: an error, not a fresh start
    assert find_resumable_checkpoint(str(work), log) is None
    cfg = tiny.make_cfg(str(work), pretrained, max_iters=2, val=False)
    cfg.resume = True
    with pytest.raises(CheckpointError, match='no complete checkpoint'):
        Runner.from_cfg(cfg).train()


# ------------------------------------------------------------------------- 4. exact resume
def _run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, RUNNER, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc


def _final_adapter(work):
    return load_file(osp.join(work, 'iter_6_adapter.safetensors'))


@pytest.fixture(scope='module')
def reference_run(pretrained, tmp_path_factory):
    """The uninterrupted run, as a process of its own like the killed one."""
    work = tmp_path_factory.mktemp('reference')
    _run(work, pretrained)
    return _final_adapter(work)


def _assert_identical(expected, got):
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # and the update is not trivially equal (training moved the cores)
    assert any(float(v.abs().max()) > 0 for k, v in got.items() if 'flora_core' in k)


def test_sigkill_then_resume_is_bit_identical(pretrained, reference_run, tmp_path):
    """Killed after iteration 3 (checkpoints at 2, 4, 6; validation at 3 and 6): the resumed
    run repeats iteration 3 from the checkpoint of iteration 2 and must end where the
    uninterrupted one did (without the restored random state it ends ~3e-2 away)."""
    killed = tmp_path / 'killed'
    proc = _run(killed, pretrained, '--kill-at', 3, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not osp.exists(killed / 'iter_4.pth')
    # as if killed between the checkpoint and its adapter file: the resume writes it
    for name in ('iter_2_adapter.safetensors', 'iter_2_adapter.json'):
        os.remove(killed / name)
    _run(killed, pretrained, '--resume')
    _assert_identical(reference_run, _final_adapter(killed))
    state = torch.load(killed / 'iter_2.pth', weights_only=True)['state_dict']
    adapter = load_file(killed / 'iter_2_adapter.safetensors')
    assert adapter and all(torch.equal(v, state[k]) for k, v in adapter.items())


def test_sigkill_from_outside_at_any_moment(pretrained, reference_run, tmp_path):
    """Killed by the parent as soon as the second checkpoint appears, wherever the child is
    (writing files, validating, training): the resumed run still ends bit-identical."""
    killed = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, RUNNER, str(killed), pretrained], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not osp.exists(killed / 'iter_4.pth') and child.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    _run(killed, pretrained, '--resume')
    _assert_identical(reference_run, _final_adapter(killed))


# ------------------------------------------------------------------------- 5. loads that fit
def test_resume_with_changed_rank_says_what_changed(pretrained, trained, tmp_path):
    cfg = tiny.make_cfg(str(tmp_path), pretrained, max_iters=8,
                        peft=dict(tiny.PEFT, rank=8))
    cfg.update(load_from=osp.join(trained, 'iter_6.pth'), resume=True)
    with pytest.raises(CheckpointError, match=r'--resume.*backbone\.rank: 4 -> 8'):
        Runner.from_cfg(cfg).train()


def test_test_run_refuses_incomplete_or_mismatched_checkpoints(pretrained, trained, tmp_path):
    data = torch.load(osp.join(trained, 'iter_6.pth'), weights_only=True)
    del data['state_dict']['head.weight']
    path = tmp_path / 'no_head.pth'
    torch.save(data, path)
    cfg = tiny.make_cfg(str(tmp_path / 't'), pretrained, val=False)
    cfg.load_from = str(path)
    with pytest.raises(CheckpointError, match=r'no_head.pth.*head\.weight'):
        Runner.from_cfg(cfg).test()
    # another rank without the recorded methods: the shapes give it away
    data = torch.load(osp.join(trained, 'iter_6.pth'), weights_only=True)
    del data['flora_mm']
    torch.save(data, path)
    cfg = tiny.make_cfg(str(tmp_path / 't2'), pretrained, val=False,
                        peft=dict(tiny.PEFT, rank=2))
    cfg.load_from = str(path)
    with pytest.raises(CheckpointError, match=r'another shape.*flora'):
        Runner.from_cfg(cfg).test()
    # non-finite values
    data = torch.load(osp.join(trained, 'iter_6.pth'), weights_only=True)
    data['state_dict']['head.bias'][0] = float('nan')
    torch.save(data, path)
    cfg = tiny.make_cfg(str(tmp_path / 't3'), pretrained, val=False)
    cfg.load_from = str(path)
    with pytest.raises(CheckpointError, match=r'non-finite.*head\.bias'):
        Runner.from_cfg(cfg).test()


def test_test_run_with_an_adapter_file_checks_the_base(pretrained, trained, tmp_path):
    """FLoRAHook(adapter_checkpoint=...) (what tools/test.py uses for a .safetensors file):
    the same model as from the full checkpoint; on another base model an error."""
    adapter = osp.join(trained, 'iter_6_adapter.safetensors')
    hook = dict(type='FLoRAHook', norm_interval=0, adapter_checkpoint=adapter)
    from_adapter = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'a'), pretrained, val=False,
                                                 hook=hook))
    from_adapter.test()
    cfg = tiny.make_cfg(str(tmp_path / 'f'), pretrained, val=False)
    cfg.load_from = osp.join(trained, 'iter_6.pth')
    from_full = Runner.from_cfg(cfg)
    from_full.test()
    expected = from_full.model.state_dict()
    got = from_adapter.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    other = str(tmp_path / 'other_base.pth')
    tiny.write_pretrained(other, seed=7)
    runner = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'o'), other, val=False, hook=hook))
    with pytest.raises(CheckpointError, match='iter_6_adapter.safetensors.*fingerprint'):
        runner.test()


def test_adapter_file_must_hold_heads_too(pretrained, trained, tmp_path):
    from safetensors.torch import save_file
    tensors = _final_adapter(trained)
    assert 'head.weight' in tensors
    del tensors['head.weight']
    path = tmp_path / 'cut_adapter.safetensors'
    save_file(tensors, str(path))
    (tmp_path / 'cut_adapter.json').write_bytes(
        open(osp.join(trained, 'iter_6_adapter.json'), 'rb').read())
    runner = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'm'), pretrained))
    with pytest.raises(KeyError, match=r'head\.weight'):
        load_adapter_checkpoint(runner.model, str(path))


def _relabel_safetensors(src, dst, name, dtype='I32'):
    """Copy a safetensors file, changing one tensor's dtype in the header only (same bytes):
    what a tampered or broken file looks like."""
    import json
    import struct
    data = open(src, 'rb').read()
    (size,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + size])
    header[name]['dtype'] = dtype
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    open(dst, 'wb').write(struct.pack('<Q', len(text)) + text + data[8 + size:])


def _adapter_copy(trained, tmp_path, stem='copy'):
    src = osp.join(trained, 'iter_6_adapter.safetensors')
    path = tmp_path / f'{stem}_adapter.safetensors'
    path.write_bytes(open(src, 'rb').read())
    (tmp_path / f'{stem}_adapter.json').write_bytes(
        open(osp.join(trained, 'iter_6_adapter.json'), 'rb').read())
    return src, path


def test_adapter_tensor_relabelled_as_integer_is_refused(pretrained, trained, tmp_path):
    """A float32 tensor whose header says int32 (same byte size) would load as integers near
    1e9 cast into float parameters: an error naming the tensor, nothing loaded."""
    src, path = _adapter_copy(trained, tmp_path)
    name = next(k for k in load_file(src) if 'flora_core' in k)
    _relabel_safetensors(src, str(path), name)
    assert load_file(str(path))[name].dtype == torch.int32
    runner = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'm'), pretrained))
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(name) + r'.*torch\.int32'):
        load_adapter_checkpoint(runner.model, str(path))
    after = runner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize('sidecar, message', [
    ('[1, 2, 3]', 'expected a JSON object.*got a list'),
    ('"text"', 'expected a JSON object.*got a str'),
    ('{"format": "flora_mm.adapter/1", "methods": [], "base_fingerprint": "x", '
     '"num_tensors": 1, "num_elements": 1, "meta": {}}', "field 'methods' must be a JSON dict"),
    ('{"format": "flora_mm.adapter/1", "methods": {}, "base_fingerprint": 3, '
     '"num_tensors": 1, "num_elements": 1, "meta": {}}', "field 'base_fingerprint' must be"),
    ('{"format": "flora_mm.adapter/1", "methods": {"": 1}, "base_fingerprint": "x", '
     '"num_tensors": 1, "num_elements": 1, "meta": {}}', "map each adapted module"),
    ('\xff\xfe', 'not valid JSON'),
])
def test_malformed_adapter_sidecar_is_a_clear_error(pretrained, trained, tmp_path, sidecar,
                                                    message):
    from flora_mm.peft.io import read_adapter_info
    _, path = _adapter_copy(trained, tmp_path)
    (tmp_path / 'copy_adapter.json').write_bytes(sidecar.encode('latin-1'))
    with pytest.raises(ValueError, match=message):
        read_adapter_info(str(path))
    runner = Runner.from_cfg(tiny.make_cfg(str(tmp_path / 'm'), pretrained))
    with pytest.raises(ValueError, match='copy_adapter.json'):
        load_adapter_checkpoint(runner.model, str(path))


def test_stale_temporaries_are_removed_and_a_failed_save_leaves_no_adapter(pretrained,
                                                                           tmp_path):
    """A save killed midway leaves a ``.tmp-*`` file: the next save of the run removes it.
    A checkpoint that cannot be written (a full disk; here its path is taken by a folder) takes
    its staged adapter pair with it, and the error names the file."""
    from flora_mm.checkpoint import AtomicLocalBackend, add_companions
    from flora_mm.utils.fileio import temporary_beside
    work = tmp_path / 'w'
    work.mkdir()
    stale = temporary_beside(str(work / 'iter_2.pth'))
    cfg = tiny.make_cfg(str(work), pretrained, max_iters=2, val=False)
    Runner.from_cfg(cfg).train()
    assert not osp.exists(stale)
    assert osp.isfile(work / 'iter_2.pth') and osp.isfile(work / 'iter_2_adapter.safetensors')
    # the companion protocol itself: a failing checkpoint write removes the staged pair
    staged = [temporary_beside(str(tmp_path / 'x_adapter.safetensors')),
              temporary_beside(str(tmp_path / 'x_adapter.json'))]
    add_companions(str(tmp_path / 'x.pth'),
                   list(zip(staged, [str(tmp_path / 'x_adapter.safetensors'),
                                     str(tmp_path / 'x_adapter.json')])))

    (tmp_path / 'x.pth').mkdir()
    with pytest.raises(OSError, match=r'could not write .*x\.pth'):
        AtomicLocalBackend().put(b'checkpoint', str(tmp_path / 'x.pth'))
    assert not any(osp.exists(p) for p in staged)
    assert not osp.exists(tmp_path / 'x_adapter.safetensors')
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.tmp-')] == []
    # and a successful write commits the pair right after the checkpoint
    staged = [temporary_beside(str(tmp_path / 'y_adapter.safetensors'))]
    open(staged[0], 'w').write('adapter')
    add_companions(str(tmp_path / 'y.pth'), [(staged[0], str(tmp_path / 'y_adapter.safetensors'))])
    AtomicLocalBackend().put(b'checkpoint', str(tmp_path / 'y.pth'))
    assert open(tmp_path / 'y_adapter.safetensors').read() == 'adapter'


class TinyBNNet(torch.nn.Module):
    """A backbone with batch norm (ResNet-like): its running statistics move in train mode."""

    out_channels = [8]

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return (torch.relu(self.bn(self.conv(x))),)


def test_batch_norm_statistics_in_train_mode_do_not_fail_a_finished_run(tmp_path):
    """A frozen backbone whose batch norms run in train mode (a timm ResNet under UperNet):
    the running statistics move (buffers, not weights); the run says so once and finishes
    (it used to train to the end and exit with 'frozen base tensors changed')."""
    from mmengine.registry import MODELS
    MODELS.register_module(module=TinyBNNet, force=True)
    cfg = tiny.make_cfg(str(tmp_path / 'bn'), 'unused.pth', max_iters=2, val=False)
    cfg.model.backbone.backbone = dict(type='TinyBNNet')
    runner = Runner.from_cfg(cfg)
    before = runner.model.backbone.bn.running_mean.clone()
    runner.train()
    assert not torch.equal(before, runner.model.backbone.bn.running_mean)
    logs = glob.glob(str(tmp_path / 'bn' / '*' / '*.log'))
    text = open(logs[0]).read()
    assert '1 batch-norm layers of the frozen backbone run in train mode' in text
    assert "['backbone.bn']" in text


def test_override_pattern_that_matches_nothing_is_an_error():
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(PEFTConfigError, match=r"pattern 'blocks\\\\.9'"):
        inject_adapters(model, dict(type='LoRA', rank=2,
                                    overrides=[dict(pattern=r'blocks\.9', rank=1)]))
    inject_adapters(model, dict(type='LoRA', rank=2, overrides=[dict(pattern=r'^1$', rank=1)]))
    assert model[1].rank == 1 and model[0].rank == 2


def test_pickle_module_of_payload_is_real(tmp_path):
    """The payload used above does run when unpickled without protection (so the tests that
    show it does not run are meaningful)."""
    marker = tmp_path / 'RAN'
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
