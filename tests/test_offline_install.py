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
import importlib.util
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


def _write_wheel(folder: Path, version: str = '0.1', name: str = PROBE,
                 build: str = 'wheelhouse') -> Path:
    """A minimal valid py3-none-any wheel with one module (``build``: what tells two builds of
    one version apart)."""
    dist = f'{name}-{version}'
    files = {
        f'{name}.py': f'VERSION = {version!r}\nBUILD = {build!r}\n'.encode(),
        f'{dist}.dist-info/METADATA':
            f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n'.encode(),
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


def _wheelhouse(folder: Path, torch_version: str, **fields) -> Path:
    """The probe's wheel and a manifest for this interpreter (``fields`` override its entries)."""
    folder.mkdir()
    wheel = _write_wheel(folder)
    manifest = {
        'format': 1, 'python': '%d.%d' % sys.version_info[:2], 'platform': 'manylinux_2_28_x86_64',
        'variant': 'cpu', 'torch': torch_version, 'torch_build': torch_version,
        'torch_cuda': torch.version.cuda, 'torch_cxx11_abi': int(torch._C._GLIBCXX_USE_CXX11_ABI),
        'torchvision': None, 'cuda_arch_list': None, 'torch_wheels_included': False,
        'install': [f'{PROBE}==0.1'],
        'wheels': {wheel.name: hashlib.sha256(wheel.read_bytes()).hexdigest()},
        **fields,
    }
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    return folder


def _target(venv: Path) -> Path:
    """A fresh venv (no pip of its own) that sees this environment's packages through a .pth."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    own = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if p != own]
    # 'import' lines of a .pth run: addsitedir also processes the parent's own .pth files
    Path(own, '_flora_parent_env.pth').write_text(
        ''.join(f'import site; site.addsitedir({p!r})\n' for p in parents))
    return py


@pytest.fixture(scope='module')
def target_python(tmp_path_factory) -> Path:
    return _target(tmp_path_factory.mktemp('target') / 'venv')


@pytest.fixture
def fresh_target(tmp_path) -> Path:
    return _target(tmp_path / 'venv')


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


# --- layered wheelhouses (NODE_PACKAGES): the stack at its pins, the rest from the node --------

def _manifest_module():
    spec = importlib.util.spec_from_file_location('wheelhouse_manifest',
                                                  ROOT / 'scripts' / 'wheelhouse_manifest.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_select_leaves_the_nodes_packages_but_never_the_stack(tmp_path):
    wm = _manifest_module()
    stack = [('mmengine', '0.10.7'), ('mmdet', '3.1.0'), ('mmsegmentation', '1.2.2'),
             ('mmrotate', '1.0.0rc1'), ('mmpretrain', '1.2.0'), ('timm', '1.0.31'),
             ('safetensors', '0.8.0'), ('setuptools', '80.9.0'), ('mmcv', '2.0.1')]
    others = [('torch', '2.11.0'), ('nvidia-cublas', '13.1.0.3'), ('numpy', '2.4.1'),
              ('opencv-python', '5.0.0.93'), ('pycocotools', '2.0.10'), ('Shapely', '2.1.2')]
    report = {'install': [{'metadata': {'name': n, 'version': v}} for n, v in stack + others]}
    node = tmp_path / 'node.txt'
    node.write_text('# pip freeze of the node\nnumpy==2.5.2\nopencv_python_headless==4.12.0.88\n'
                    '-e git+https://example.org/x.git#egg=x\nsetuptools==82.0.0\ntimm==1.0.0\n'
                    '\ntorch==2.11.0\n')
    closure, download, left = wm.select(report, wm.read_node_packages(str(node)), False)
    # torch's family is the target's; mmcv is compiled, not downloaded
    assert closure == {**{n: v for n, v in stack}, 'numpy': '2.4.1', 'opencv-python': '5.0.0.93',
                       'pycocotools': '2.0.10', 'shapely': '2.1.2'}
    # the stack is collected even where the node has it (setuptools for pkg_resources, timm);
    # headless cv2 stands in for opencv-python
    assert download == [f'{n}=={v}' for n, v in stack if n != 'mmcv'] + [
        'pycocotools==2.0.10', 'Shapely==2.1.2']
    assert left == ['numpy', 'opencv-python']
    # without a node list, everything but torch's family and mmcv
    _, full, none_left = wm.select(report, None, False)
    assert len(full) == len(stack) - 1 + 4 and none_left == []
    # a stack package the requirements no longer pull would silently not be installed
    without_timm = {'install': [i for i in report['install'] if i['metadata']['name'] != 'timm']}
    with pytest.raises(SystemExit, match="lacks the stack packages \\['timm'\\]"):
        wm.select(without_timm, None, False)
    empty = tmp_path / 'empty.txt'
    empty.write_text('# nothing\n')
    with pytest.raises(ValueError, match='names no package'):
        wm.read_node_packages(str(empty))


def _layered_wheelhouse(folder: Path, closure: dict, built_here: bool = False) -> Path:
    return _wheelhouse(folder, torch.__version__.split('+')[0], format=2, install=[],
                       closure=closure, layered=True, node_packages=['pytest'],
                       built_here=[f'{PROBE}-0.1-py3-none-any.whl'] if built_here else [])


def test_layered_install_keeps_the_nodes_packages(tmp_path, fresh_target):
    import importlib.metadata
    have_safetensors = importlib.metadata.version('safetensors')
    wh = _layered_wheelhouse(tmp_path / 'wh', {
        'flora-offline-probe': '0.1',    # the node lacks it: from the folder
        'pytest': '0.0.1',               # the node has another version: kept, with a note
        'safetensors': have_safetensors,  # stack, already at its pin: nothing to install
    })
    res = _run(wh, fresh_target)
    assert res.returncode == 0, res.stderr
    assert 'layered: 1 to install' in res.stderr, res.stderr
    assert f"pytest: the node's {pytest.__version__} kept" in res.stderr, res.stderr
    assert 'env ok: torch' in res.stderr, res.stderr
    assert _installed(fresh_target)


def test_layered_install_names_what_neither_side_has(tmp_path, fresh_target):
    wh = _layered_wheelhouse(tmp_path / 'wh', {'flora-offline-probe': '0.1',
                                               'flora-absent-dependency': '1.0',
                                               'mmdet': '0.0.1'})  # stack at another version
    res = _run(wh, fresh_target)
    assert res.returncode != 0
    assert 'flora-absent-dependency==1.0' in res.stderr and 'mmdet==0.0.1' in res.stderr, res.stderr
    assert 'NODE_PACKAGES' in res.stderr, res.stderr
    assert not _installed(fresh_target)  # nothing installed when the plan fails


def test_layered_plan_pins_the_stack_and_leaves_built_wheels_to_their_files():
    wm = _manifest_module()
    m = {'closure': {'mmdet': '3.1.0', 'timm': '1.0.31', 'mmcv': '2.0.1', 'flora-mm': '0.1.0',
                     'numpy': '2.4.1', 'opencv-python': '5.0.0.93', 'pycocotools': '2.0.11'},
         'wheels': {f: '' for f in ['mmdet-3.1.0-py3-none-any.whl', 'timm-1.0.31-py3-none-any.whl',
                                    'mmcv-2.0.1-cp312-cp312-linux_x86_64.whl',
                                    'flora_mm-0.1.0-py3-none-any.whl',
                                    'pycocotools-2.0.11-cp312-abi3-manylinux_2_28_x86_64.whl']}}
    node = {'mmdet': '3.0.0', 'timm': '1.0.31', 'mmcv': '2.0.1', 'numpy': '',
            'opencv-python-headless': '5.1.0.95'}
    pins, kept = wm.layered_plan(m, node)
    # the node's mmdet 3.0.0 is replaced; its timm is the pin already; mmcv and flora_mm are
    # reinstalled from their files by the script (a same-numbered mmcv may be another build)
    assert pins == ['mmdet==3.1.0', 'pycocotools==2.0.11']
    assert kept == ["numpy: the node's  kept (the closure has 2.4.1)",
                    "opencv-python: the node's opencv-python-headless 5.1.0.95 kept "
                    '(the closure has 5.0.0.93)']
    del m['wheels']['mmcv-2.0.1-cp312-cp312-linux_x86_64.whl']
    with pytest.raises(SystemExit, match='mmcv==2.0.1'):
        wm.layered_plan(m, node)


def test_manifest_records_the_closure_and_the_wheels_built_here(tmp_path):
    wm = _manifest_module()
    out = tmp_path / 'wh'
    out.mkdir()
    for name in ('mmcv-2.0.1-cp312-cp312-linux_x86_64.whl', 'flora_mm-0.1.0-py3-none-any.whl',
                 'mmdet-3.1.0-py3-none-any.whl'):
        (out / name).write_bytes(name.encode())
    (tmp_path / 'reqs.txt').write_text('mmdet==3.1.0\nnumpy==2.4.1\n')
    (tmp_path / 'closure.json').write_text(json.dumps({
        'closure': {'mmdet': '3.1.0', 'mmcv': '2.0.1', 'numpy': '2.4.1'},
        'node_packages': ['numpy'], 'left_to_node': ['numpy']}))
    fields = {'python': '3.12', 'variant': 'cuda', 'torch': '2.11.0', 'mmcv': '2.0.1'}
    wm.main(['write', str(out), '--requirements', str(tmp_path / 'reqs.txt'),
             '--closure-json', str(tmp_path / 'closure.json'), '--fields', json.dumps(fields)])
    m = json.loads((out / 'manifest.json').read_text())
    assert m['layered'] and m['node_packages'] == ['numpy'] and m['variant'] == 'cuda'
    assert m['closure'] == {'mmdet': '3.1.0', 'mmcv': '2.0.1', 'numpy': '2.4.1',
                            'flora-mm': '0.1.0'}  # flora_mm's own wheel joins the closure
    assert m['built_here'] == ['flora_mm-0.1.0-py3-none-any.whl',
                               'mmcv-2.0.1-cp312-cp312-linux_x86_64.whl']
    assert m['install'] == ['mmdet==3.1.0', 'numpy==2.4.1', 'mmcv==2.0.1', 'flora_mm']
    assert m['wheels'] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                           for f in out.glob('*.whl')}
    assert not list(out.glob('*.part'))


def test_a_same_numbered_build_on_the_node_is_replaced_by_the_wheelhouses(tmp_path, fresh_target):
    """What happens to mmcv 2.0.1 of another build (CPU variant, other torch) on the node: pip
    alone would keep it, since the version is the same."""
    other = tmp_path / 'other'
    other.mkdir()
    subprocess.run([str(fresh_target), '-m', 'pip', 'install', '-q', '--no-index', '--no-deps',
                    str(_write_wheel(other, build='the node'))], check=True,
                   env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))
    wh = _layered_wheelhouse(tmp_path / 'wh', {'flora-offline-probe': '0.1'}, built_here=True)
    res = _run(wh, fresh_target)
    assert res.returncode == 0, res.stderr
    build = subprocess.run([str(fresh_target), '-c', f'import {PROBE}; print({PROBE}.BUILD)'],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert build == 'wheelhouse'
