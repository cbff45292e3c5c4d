"""scripts/install_offline.sh on a small wheelhouse, for real: pip runs with no index.

The wheelhouse holds one tiny pure-Python wheel written here and a manifest in the format of
scripts/wheelhouse.sh (mmcv is not compiled again: the target interpreter sees this suite's
environment, whose mmcv ops the script's import + ops check then exercises). The target is a
fresh venv without pip whose site-packages chain to this environment's (torch, pip, mmcv), so what
pip installs lands in the throwaway venv only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'scripts' / 'install_offline.sh'
PROBE = 'flora_offline_probe'


def _write_wheel(folder: Path, version: str = '0.1') -> Path:
    """A minimal valid py3-none-any wheel with one module."""
    dist = f'{PROBE}-{version}'
    files = {
        f'{PROBE}.py': f'VERSION = {version!r}\n'.encode(),
        f'{dist}.dist-info/METADATA':
            f'Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n'.encode(),
        f'{dist}.dist-info/WHEEL':
            b'Wheel-Version: 1.0\nGenerator: flora_mm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n',
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()
        record.append(f'{name},sha256={digest},{len(data)}')
    record.append(f'{dist}.dist-info/RECORD,,')
    files[f'{dist}.dist-info/RECORD'] = ('\n'.join(record) + '\n').encode()
    path = folder / f'{dist}-py3-none-any.whl'
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _wheelhouse(folder: Path, torch_version: str) -> Path:
    folder.mkdir()
    wheel = _write_wheel(folder)
    manifest = {
        'format': 1, 'python': '%d.%d' % sys.version_info[:2], 'platform': 'manylinux_2_28_x86_64',
        'variant': 'cpu', 'torch': torch_version, 'torch_build': torch_version,
        'torch_cuda': torch.version.cuda, 'torch_cxx11_abi': int(torch._C._GLIBCXX_USE_CXX11_ABI),
        'torchvision': None, 'cuda_arch_list': None, 'torch_wheels_included': False,
        'install': [f'{PROBE}==0.1'],
        'wheels': {wheel.name: hashlib.sha256(wheel.read_bytes()).hexdigest()},
    }
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope='module')
def target_python(tmp_path_factory) -> Path:
    """A fresh venv (no pip of its own) that sees this environment's packages through a .pth."""
    venv = tmp_path_factory.mktemp('target') / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    own = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if p != own]
    # 'import' lines of a .pth run: addsitedir also processes the parent's own .pth files
    Path(own, '_flora_parent_env.pth').write_text(
        ''.join(f'import site; site.addsitedir({p!r})\n' for p in parents))
    return py


def _run(wheelhouse: Path, py: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX='1', PIP_CONFIG_FILE=os.devnull)
    env.pop('PIP_FIND_LINKS', None)  # only the wheelhouse
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return subprocess.run(['bash', str(SCRIPT), str(wheelhouse), str(py)], env=env,
                          capture_output=True, text=True, timeout=300)


def _installed(py: Path) -> bool:
    probe = subprocess.run([str(py), '-c', f'import {PROBE}, sys; print({PROBE}.__file__)'],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip().startswith(str(py.parents[1]))


def test_torch_mismatch_names_both_versions(tmp_path, target_python):
    res = _run(_wheelhouse(tmp_path / 'wh', '2.0.0'), target_python)
    assert res.returncode != 0
    assert 'torch version mismatch' in res.stderr, res.stderr
    assert torch.__version__ in res.stderr and '2.0.0' in res.stderr, res.stderr
    assert not _installed(target_python)


def test_tampered_wheel_is_refused(tmp_path, target_python):
    wh = _wheelhouse(tmp_path / 'wh', torch.__version__.split('+')[0])
    wheel = next(wh.glob('*.whl'))
    wheel.write_bytes(wheel.read_bytes() + b'\0')  # still a readable zip, another sha256
    res = _run(wh, target_python)
    assert res.returncode != 0
    assert 'sha256 mismatch' in res.stderr and wheel.name in res.stderr, res.stderr
    assert not _installed(target_python)


def test_unlisted_wheel_is_refused(tmp_path, target_python):
    wh = _wheelhouse(tmp_path / 'wh', torch.__version__.split('+')[0])
    _write_wheel(wh, version='0.2')  # pip would prefer it, but the manifest does not name it
    res = _run(wh, target_python)
    assert res.returncode != 0 and 'unlisted wheel' in res.stderr, res.stderr
    assert not _installed(target_python)


def test_matching_manifest_installs_without_index(tmp_path, target_python):
    wh = _wheelhouse(tmp_path / 'wh', torch.__version__.split('+')[0])
    res = _run(wh, target_python)
    assert res.returncode == 0, res.stderr
    assert 'sha256 checked' in res.stderr and 'env ok: torch' in res.stderr, res.stderr
    assert _installed(target_python)  # into the throwaway venv, from the folder
