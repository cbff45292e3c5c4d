"""The manifest of an offline wheelhouse: which wheels to collect (scripts/wheelhouse.sh), the
manifest itself, and, on the target, the checks and the install plan (scripts/install_offline.sh).

Standard library only: on the target it runs with the target's interpreter before anything of
flora_mm is installed there.

Two kinds of wheelhouse:
- full (default): every wheel of the stack's closure except torch's own; the target's pip
  installs the pinned list with its dependencies from the folder.
- layered (``NODE_PACKAGES=FILE`` at build time: the target's ``pip list --format=freeze``, or
  one name per line): for a node whose image already holds most of the closure (numpy, scipy,
  opencv, matplotlib...). Only the STACK packages and what the node lacks are collected; on the
  node every STACK package is installed at its pin and every other package of the closure is
  kept as the node has it, or installed from the folder where the node lacks it. Such a
  wheelhouse is a fraction of the size (what fits a transfer limit or a scratch quota).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import sys

# Installed at exactly the wheelhouse's versions even where the node has another version:
# flora_mm's code and mmcv's compiled ops are written and tested against these (mmengine needs
# setuptools < 81 for pkg_resources at run time).
STACK = frozenset({'mmengine', 'mmcv', 'mmdet', 'mmsegmentation', 'mmrotate', 'mmpretrain',
                   'timm', 'safetensors', 'setuptools', 'flora-mm'})
# torch and its GPU runtime come with the target (unless the wheelhouse is built TORCH_WHEELS=1)
TORCH_FAMILY = re.compile(
    r'^(torch|torchvision|triton|nvidia-.*|cuda-toolkit|cuda-bindings|cuda-pathfinder)$')
# built by wheelhouse.sh, not downloaded: the same version number can be another build (mmcv's
# CPU variant, a flora_mm of other code), so the target reinstalls these from their files
BUILT_HERE = frozenset({'mmcv', 'flora-mm'})
# a node package that provides the same import as the closure's (cv2 here)
PROVIDED_BY = {
    'opencv-python': ('opencv-python-headless', 'opencv-contrib-python',
                      'opencv-contrib-python-headless'),
}


def normalise(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r'[-_.]+', '-', name).lower()


def read_node_packages(path: str) -> set[str]:
    """Names from a ``pip list --format=freeze`` / ``pip freeze`` file or a plain list of names.
    Option lines (``-e ...`` editable installs, ``--index-url``) name nothing in the closure."""
    names = set()
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if not line or line.startswith('-'):
                continue
            m = re.match(r'^([A-Za-z0-9][A-Za-z0-9._-]*)', line)
            if m is None:
                raise ValueError(f'{path}: cannot read a package name from {line!r}')
            names.add(normalise(m.group(1)))
    if not names:
        raise ValueError(f'{path} names no package')
    return names


def node_provides(name: str, have: set[str] | dict) -> bool:
    return name in have or any(alt in have for alt in PROVIDED_BY.get(name, ()))


def select(report: dict, node: set[str] | None, torch_wheels: bool
           ) -> tuple[dict[str, str], list[str], list[str]]:
    """From pip's resolution report: (closure name -> version, wheels to download as pins,
    closure packages left to the node). mmcv is not downloaded (it is compiled here)."""
    closure: dict[str, str] = {}
    download, left = [], []
    for item in report['install']:
        raw, version = item['metadata']['name'], item['metadata']['version']
        name = normalise(raw)
        if TORCH_FAMILY.match(name) and not torch_wheels:
            continue
        closure[name] = version
        if name == 'mmcv':
            continue
        if node is not None and name not in STACK and node_provides(name, node):
            left.append(name)
            continue
        download.append(f'{raw}=={version}')
    absent = sorted(STACK - BUILT_HERE - set(closure))
    if absent:  # the requirements files and STACK disagree: the layered install would skip them
        raise SystemExit(f'the resolved closure lacks the stack packages {absent}: '
                         'requirements.txt and STACK in scripts/wheelhouse_manifest.py disagree')
    return closure, download, left


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def write_manifest(out: str, *, install: list[str], closure: dict[str, str],
                   node_packages: list[str] | None, **fields) -> dict:
    wheels = {f: sha256(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith('.whl')}
    built = sorted(f for f in wheels if wheel_name(f) in BUILT_HERE)
    manifest = {
        'format': 2,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'built_on': platform.platform(),
        **fields,
        'install': install,
        'closure': closure,
        'layered': node_packages is not None,
        'node_packages': sorted(node_packages) if node_packages is not None else None,
        'built_here': built,
        'wheels': wheels,
    }
    tmp = os.path.join(out, 'manifest.json.part')
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, 'manifest.json'))
    return manifest


def check_wheelhouse(wh: str) -> dict:
    """The manifest, after every listed wheel is found with its sha256 and no other is there."""
    with open(os.path.join(wh, 'manifest.json')) as f:
        m = json.load(f)
    errors = []
    listed = m['wheels']
    present = {f for f in os.listdir(wh) if f.endswith('.whl')}
    for f in sorted(set(listed) - present):
        errors.append(f'missing wheel {f} (listed in manifest.json)')
    for f in sorted(present - set(listed)):
        errors.append(f'unlisted wheel {f} in the wheelhouse (not in manifest.json): remove it')
    for f in sorted(present & set(listed)):
        digest = sha256(os.path.join(wh, f))
        if digest != listed[f]:
            errors.append(f'sha256 mismatch for {f}: manifest {listed[f]}, file {digest}')
    if errors:
        raise SystemExit('wheelhouse ' + wh + ' fails its manifest:\n  ' + '\n  '.join(errors))
    return m


def wheel_name(filename: str) -> str:
    """The normalised project name of a wheel file (``mmcv-2.0.1-cp312-...whl`` -> mmcv)."""
    return normalise(filename.split('-', 1)[0])


def layered_plan(m: dict, installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(pins to install without dependencies, notes on what the node keeps). Raises SystemExit
    naming every closure package that is neither on the node nor in the wheelhouse. The
    BUILT_HERE wheels are not in the pins: install_offline.sh reinstalls them from their files."""
    in_folder = {wheel_name(f) for f in m['wheels']}
    pins, kept, missing = [], [], []
    for name, version in sorted(m['closure'].items()):
        if name in BUILT_HERE:
            if name not in in_folder:
                missing.append(f'{name}=={version}')
            continue
        if name in STACK or not node_provides(name, installed):
            if installed.get(name) == version:
                continue
            if name in in_folder:
                pins.append(f'{name}=={version}')
            else:
                missing.append(f'{name}=={version}')
        else:
            have = installed[name] if name in installed else next(
                f'{alt} {installed[alt]}' for alt in PROVIDED_BY[name] if alt in installed)
            if have != version:
                kept.append(f'{name}: the node\'s {have} kept (the closure has {version})')
    if missing:
        raise SystemExit(
            'this interpreter lacks packages that the layered wheelhouse left to the node: '
            + ', '.join(missing) + '. Build the wheelhouse with this node\'s own list '
            '(python -m pip list --format=freeze > node.txt; make wheelhouse NODE_PACKAGES=node.txt)'
            ' or without NODE_PACKAGES (a full one)')
    return pins, kept


def plan(wh: str) -> list[str]:
    """Check the wheelhouse and this interpreter against the manifest; the install list."""
    import importlib.metadata
    import importlib.util

    m = check_wheelhouse(wh)
    py = '%d.%d' % sys.version_info[:2]
    if py != m['python']:
        raise SystemExit(f'interpreter {sys.executable} is Python {py}; the wheelhouse is built '
                         f"for Python {m['python']}")
    if importlib.util.find_spec('torch') is None:
        raise SystemExit(f"{sys.executable} has no torch: install torch {m['torch']} first (the "
                         f"wheelhouse was built against torch {m['torch_build']}, CUDA "
                         f"{m['torch_cuda']})")
    import torch

    have = torch.__version__.split('+')[0]
    if have != m['torch']:
        raise SystemExit(f'torch version mismatch: the interpreter has torch {torch.__version__}, '
                         f"the wheelhouse's mmcv was compiled against torch {m['torch_build']} "
                         f'(build a wheelhouse for this torch: make wheelhouse TORCH={have})')
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    if abi != m['torch_cxx11_abi']:
        raise SystemExit(f"torch C++ ABI mismatch: the interpreter's torch {torch.__version__} "
                         f"has _GLIBCXX_USE_CXX11_ABI={abi}, the wheelhouse's torch "
                         f"{m['torch_build']} had {m['torch_cxx11_abi']}")
    cuda = torch.version.cuda

    def mm(v):
        return '.'.join(str(v).split('.')[:2]) if v else None

    if m['variant'] == 'cuda' and mm(cuda) != mm(m['torch_cuda']):
        raise SystemExit(f'torch CUDA mismatch: the interpreter has torch {torch.__version__} '
                         f"built for CUDA {cuda}, the wheelhouse's CUDA kernels were compiled "
                         f"for torch {m['torch_build']} with CUDA {m['torch_cuda']}")
    if mm(cuda) != mm(m['torch_cuda']):
        print(f"note: torch {torch.__version__} (CUDA {cuda}) vs the wheelhouse's "
              f"{m['torch_build']} (CUDA {m['torch_cuda']}): fine for the cpu variant, whose ops "
              'link no CUDA', file=sys.stderr)
    listed = m['wheels']
    if m.get('layered'):
        installed: dict[str, str] = {}
        for d in importlib.metadata.distributions():  # sys.path order: the first is imported
            if d.metadata['Name']:
                installed.setdefault(normalise(d.metadata['Name']), d.version)
        install, kept = layered_plan(m, installed)
        for line in kept:
            print('note: ' + line, file=sys.stderr)
        mode = (f"layered: {len(install)} to install, {len(m.get('built_here') or [])} built "
                f"here reinstalled, the rest of the closure of {len(m['closure'])} from the node")
    else:
        install = list(m['install'])
        mode = 'full'
    if importlib.util.find_spec('torchvision') is None:
        if not any(f.startswith('torchvision-') for f in listed):
            raise SystemExit(f"{sys.executable} has no torchvision and the wheelhouse none: "
                             f"install torchvision {m['torchvision']} (the one paired with torch "
                             f"{m['torch']}) first")
        install.append(f"torchvision=={m['torchvision']}")
    print(f"wheelhouse ok ({len(listed)} wheels, sha256 checked, {mode}); torch "
          f"{torch.__version__} (CUDA {cuda}) matches; variant {m['variant']}"
          + (f", archs {m['cuda_arch_list']}" if m['cuda_arch_list'] else ''), file=sys.stderr)
    return install


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('select', help="the wheels to download, from pip's --report")
    s.add_argument('report')
    s.add_argument('download_list')
    s.add_argument('closure_json')
    s.add_argument('--node-packages')
    s.add_argument('--torch-wheels', action='store_true')
    w = sub.add_parser('write', help='manifest.json of a collected wheelhouse')
    w.add_argument('out')
    w.add_argument('--requirements', required=True)
    w.add_argument('--closure-json', required=True)
    w.add_argument('--fields', required=True, help='JSON of the target fields')
    pl = sub.add_parser('plan', help='check a wheelhouse here; print the install list')
    pl.add_argument('wheelhouse')
    args = p.parse_args(argv)

    if args.cmd == 'select':
        with open(args.report) as f:
            report = json.load(f)
        try:
            node = read_node_packages(args.node_packages) if args.node_packages else None
        except (OSError, ValueError) as err:
            raise SystemExit(f'NODE_PACKAGES: {err}')
        closure, download, left = select(report, node, args.torch_wheels)
        with open(args.download_list, 'w') as f:
            f.writelines(line + '\n' for line in download)
        with open(args.closure_json, 'w') as f:
            json.dump({'closure': closure, 'node_packages': sorted(node) if node else None,
                       'left_to_node': left}, f, indent=1)
        if node is not None:
            print(f'layered: {len(left)} of the closure\'s {len(closure)} packages left to the '
                  f'node ({", ".join(left)})', file=sys.stderr)
    elif args.cmd == 'write':
        with open(args.closure_json) as f:
            sel = json.load(f)
        with open(args.requirements) as f:
            reqs = [line.strip() for line in f if line.strip()]
        fields = json.loads(args.fields)
        install = reqs + [f"mmcv=={fields.pop('mmcv')}", 'flora_mm']
        closure = dict(sel['closure'])
        for f in os.listdir(args.out):  # flora_mm's own wheel is built, not resolved
            if wheel_name(f) == 'flora-mm' and f.endswith('.whl'):
                closure['flora-mm'] = f.split('-')[1]
        m = write_manifest(args.out, install=install, closure=closure,
                           node_packages=sel['node_packages'], **fields)
        size = sum(os.path.getsize(os.path.join(args.out, f)) for f in m['wheels'])
        print(f"{len(m['wheels'])} wheels, {size / 2 ** 20:.0f} MiB"
              + (' (layered)' if m['layered'] else ''), file=sys.stderr)
    else:
        print('\n'.join(plan(args.wheelhouse)))


if __name__ == '__main__':
    main()
