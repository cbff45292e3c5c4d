"""flora_mm installed as a package (``pip install``, not editable) starts its tools without a
checkout: ``python -m flora_mm.cli.<tool>`` imports the installed copy, and the checkout's
``tools/compare.py`` shell still runs.

The package is built from a copy of the checkout's sources (pyproject.toml, README.md,
flora_mm/) so the build writes nothing (build/, *.egg-info) into the checkout, and installed
with ``pip --target`` into a temporary folder: the shared environment is not touched. The
processes run in a folder outside the checkout with only that folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('installed')
    src, site = tmp / 'src', tmp / 'site'
    shutil.copytree(osp.join(ROOT, 'flora_mm'), src / 'flora_mm',
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(osp.join(ROOT, name), src / name)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation',
         '--no-index', '--disable-pip-version-check', '--quiet', '--target', str(site),
         str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and 'No module named pip' in proc.stderr:
        pytest.skip('pip is not installed in this environment')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (site / 'flora_mm' / 'cli' / 'compare.py').is_file()
    assert not (site / 'tools').exists()  # the package only: no checkout in the install
    work = tmp / 'elsewhere'  # a working folder outside the checkout
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSAFEPATH')}
    env['PYTHONPATH'] = str(site)
    return dict(site=str(site), cwd=str(work), env=env)


def _run(installed: dict, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=installed['cwd'], env=installed['env'],
                          capture_output=True, text=True, timeout=300)


def test_module_imports_the_installed_package(installed):
    """``python -m flora_mm.cli.compare`` from the install: the flora_mm that process imports
    is the installed one, and --help works."""
    probe = ('import runpy, sys, flora_mm, flora_mm.cli.compare as c; '
             'print(flora_mm.__file__); print(c.__file__); sys.stdout.flush(); '
             "sys.argv = ['compare.py', '--help']; "
             "runpy.run_module('flora_mm.cli.compare', run_name='__main__', alter_sys=True)")
    proc = _run(installed, ['-c', probe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, module = proc.stdout.splitlines()[:2]
    for path in (package, module):
        assert osp.realpath(path).startswith(osp.realpath(installed['site']) + os.sep), path
    assert 'usage: compare.py' in proc.stdout

    proc = _run(installed, ['-m', 'flora_mm.cli.compare', '--help'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('usage: compare.py') and '--budgets' in proc.stdout
    help_text = proc.stdout

    # the checkout's shell gives the same tool (it puts the checkout first on sys.path)
    proc = _run(installed, [osp.join(ROOT, 'tools', 'compare.py'), '--help'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == help_text


def test_installed_tool_refuses_bad_numbers(installed):
    proc = _run(installed, ['-m', 'flora_mm.cli.compare', 'c.py', '--jobs', '0'])
    assert proc.returncode == 2 and 'argument --jobs: must be an integer >= 1' in proc.stderr


def test_one_run_compare_from_the_installed_package(installed, tmp_path):
    """A one-run comparison (Frozen, one epoch on 4 tiny COCO images) started from the
    installed package: its training and test processes import the installed flora_mm too. The
    installed copy's train / test modules are given a line that prints where flora_mm came
    from, so the runs' logs say which one they used."""
    site = installed['site']
    for tool in ('train', 'test'):
        with open(osp.join(site, 'flora_mm', 'cli', f'{tool}.py'), 'a') as f:
            f.write('\nimport flora_mm as _f, sys as _s\n'
                    "print('[probe] flora_mm from', _f.__file__, file=_s.stderr)\n")
    work = str(tmp_path)
    proc = _run(installed, ['-m', 'flora_mm.cli.make_tiny_data', '--out', f'{work}/data/tiny',
                            '--tasks', 'coco', '--num-train', '4', '--num-val', '2'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(installed, ['-m', 'flora_mm.cli.compare',
                            osp.join(ROOT, 'configs/coco/tiny/convnextv2_flora_r16.py'),
                            '--methods', 'Frozen', '--max-epochs', '1', '--cwd', work,
                            '--out', f'{work}/out'])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '| Base | - |' in proc.stdout and osp.isfile(f'{work}/out/compare.png')
    run_dir = osp.join(work, 'out', 'coco', 'convnextv2_flora_r16-frozen')
    for log in ('train.log', 'test.log'):
        with open(osp.join(run_dir, log)) as f:
            text = f.read()
        assert text.startswith(f'$ {sys.executable} -m flora_mm.cli.'), text[:300]
        probes = [line.split(' from ', 1)[1] for line in text.splitlines()
                  if line.startswith('[probe]')]
        assert len(probes) == 1, probes
        assert osp.realpath(probes[0]) == osp.realpath(osp.join(site, 'flora_mm', '__init__.py'))
