"""The package's floors point down only, and the engine, the tools' functions and the norms
never name a PEFT method or a backbone class (they ask the registry and the descriptions).

Read from the source with ``ast`` (imports inside functions count too), so a new module is
checked for free.
"""
import ast
import os
import os.path as osp

import pytest

import flora_mm  # noqa: F401  (registers the methods)
from flora_mm.models.descriptions.base import _DESCRIPTIONS
from flora_mm.registry import PEFT_METHODS

PACKAGE = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'flora_mm')
#: each sub-package's floor; a module may import its own floor and the ones below
FLOORS = {'utils': 0, 'registry': 0, 'dist': 0, 'ops': 0, 'checkpoint': 1, 'compat': 2,
          'peft': 3, 'models': 4, 'datasets': 5, 'engine': 6, '': 7, 'apis': 8, 'harness': 9,
          'cli': 10}
#: where no method name or backbone class may appear
NEUTRAL = ('engine', 'apis', 'peft/norms.py')


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith('.py'):
                path = osp.join(folder, file)
                rel = osp.relpath(path, PACKAGE)
                yield rel, ast.parse(open(path).read(), rel)


def _floor_of(rel: str) -> str:
    head = rel.split(os.sep)[0]
    return '' if head == '__init__.py' else head[:-3] if head.endswith('.py') else head


def _imported(rel: str, tree: ast.AST):
    package = ['flora_mm', *rel[:-3].split(os.sep)[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split('.') if node.module else [])
            else:
                target = (node.module or '').split('.')
            if target[0] != 'flora_mm':
                continue
            if len(target) == 1:  # from flora_mm import x / from . import x (in the root)
                yield from (['flora_mm', a.name] for a in node.names)
            else:
                yield target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'flora_mm':
                    yield alias.name.split('.')


def test_every_floor_is_listed():
    assert {_floor_of(rel) for rel, _ in _modules()} <= set(FLOORS)


@pytest.mark.parametrize('rel, tree', list(_modules()), ids=lambda v: v if isinstance(v, str)
                         else '')
def test_imports_point_down(rel, tree):
    here = FLOORS[_floor_of(rel)]
    up = []
    for target in _imported(rel, tree):
        name = target[1] if len(target) > 1 else ''
        floor = FLOORS.get(name, FLOORS[''])  # a name of the root (flora_mm.__version__)
        if floor > here:
            up.append('.'.join(target))
    assert not up, f'{rel} imports from a higher floor: {up}'


def _forbidden_names() -> set[str]:
    names = set(PEFT_METHODS.module_dict)  # method names and aliases ('Base')
    for cls in set(PEFT_METHODS.module_dict.values()):
        names.add(cls.__name__)
        if cls.layer_cls is not None:
            names.add(cls.layer_cls.__name__)
    names |= {path.rsplit('.', 1)[1] for path in _DESCRIPTIONS}
    return names


@pytest.mark.parametrize('rel, tree', [(r, t) for r, t in _modules()
                                       if r.startswith(NEUTRAL)], ids=lambda v: v
                         if isinstance(v, str) else '')
def test_no_method_or_backbone_named_in_the_engine(rel, tree):
    forbidden = _forbidden_names()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in forbidden:
            found.append(f'{node.value!r} (line {node.lineno})')
        elif isinstance(node, ast.Name) and node.id in forbidden:
            found.append(f'{node.id} (line {node.lineno})')
        elif isinstance(node, ast.alias) and node.name.split('.')[-1] in forbidden:
            found.append(f'import {node.name}')
    assert not found, f'{rel} names {found}'
