"""Shared fixtures: tiny data on disk and the tiny task configs pointed at it."""
import functools
import os

import pytest
from mmengine.config import Config

import flora_mm  # noqa: F401  (compat shims before any OpenMMLab import)

# a seventh PEFT method, registered before collection: the shared method tests read the
# registry (tests/_methods.py), so they run on it too
from . import test_toy_method  # noqa: F401,E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIGS = {
    'coco': 'configs/coco/tiny/convnextv2_flora_r16.py',
    'ade20k': 'configs/ade20k/tiny/convnextv2_flora_r16.py',
    'ade20k_internvit': 'configs/ade20k/tiny/internvit6b_flora_r16.py',
    'dota': 'configs/dota/tiny/convnextv2_flora_r16.py',
}


# what torchrun / slurm set for a rank; a tool's parse_args run in-process exports LOCAL_RANK
# (mmdet's convention), slurm_environment() the rest
LAUNCHER_ENV = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                'MASTER_PORT', 'GROUP_RANK', 'TORCHELASTIC_RUN_ID')


@pytest.fixture(autouse=True)
def _launcher_env_restored():
    """No test leaves launcher variables behind: a later subprocess that inherits LOCAL_RANK
    takes itself for a torchrun rank (and fails without RANK)."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs two workers), the workers share the cores: each
    worker's torch, and the processes its tests start, get cores // workers threads, so that
    two workers on two cores do not run four threads."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 0)
    if workers > 1:
        import torch
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault('OMP_NUM_THREADS', str(threads))
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip without a CUDA device, with the reason in the summary."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (run `make gpu-check` on a GPU machine)')
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)


@pytest.fixture
def dota_metric_in_threads(monkeypatch):
    """mmrotate's DOTAMetric computes per-class TP/FP in a fresh ``Pool(4)`` of 'spawn'
    processes per evaluation, each importing torch and mmrotate (~5 s of CPU apiece here, for
    four tiny patches). In this test only, threads compute the same thing without that start."""
    import types
    from multiprocessing.pool import ThreadPool

    from mmrotate.evaluation.functional import mean_ap
    monkeypatch.setattr(mean_ap, 'get_context',
                        lambda method: types.SimpleNamespace(Pool=ThreadPool))


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory):
    """Tiny COCO / ADE20K / DOTA and the stand-in pretrained checkpoints, written once."""
    from flora_mm.datasets.checkpoints import generate_checkpoints
    from flora_mm.datasets.tiny import generate
    root = tmp_path_factory.mktemp('tiny')
    generate(str(root), num_train=8, num_val=4)
    generate_checkpoints(str(root))
    return str(root)


def register_scope(scope: str) -> None:
    """Register the task package's modules and make it the default scope."""
    from mmengine.registry import init_default_scope

    from flora_mm.utils import register_task_modules
    register_task_modules(scope)
    init_default_scope(scope)


@functools.lru_cache(maxsize=None)
def _tiny_config_text(path: str, tiny_root: str) -> str:
    cfg = Config.fromfile(path)
    return cfg.pretty_text.replace("'data/tiny", f"'{tiny_root}")


def tiny_config(name: str, tiny_root: str) -> Config:
    """A tiny config (a key of ``TINY_CONFIGS`` or a path from the repository root) with every
    'data/tiny' path moved under ``tiny_root``; a new Config each call. The file is parsed once
    per process: mmengine reads every metafile of mmdet / mmrotate for each ``mmdet::`` base
    (~0.6 s a parse, and test_task_models alone asks 62 times)."""
    text = _tiny_config_text(os.path.join(ROOT, TINY_CONFIGS.get(name, name)), str(tiny_root))
    return Config.fromstring(text, file_format='.py')


def loss_backward(model, data: dict) -> dict:
    """One training loss of an mmdet / mmseg / mmrotate model on ``data`` (a collated batch),
    checked finite and backpropagated; returns its log variables."""
    import torch
    model.train()
    batch = model.data_preprocessor(data, True)
    loss, log_vars = model.parse_losses(model(**batch, mode='loss'))
    assert torch.isfinite(loss), log_vars
    loss.backward()
    return log_vars
