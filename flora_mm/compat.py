"""Work-arounds the pinned OpenMMLab stack needs on Python 3.11 / torch 2.14.

Imported by ``flora_mm/__init__.py`` before any OpenMMLab package, so that a config's
``custom_imports=['flora_mm']`` or ``import flora_mm`` is enough. Nothing here edits an installed
package; each shim only adds what the old package expects to find.
"""
import collections
import collections.abc

# mmrotate 1.0.0rc1 does ``from collections import Sequence`` (removed in Python 3.10).
for _name in ('Sequence', 'Mapping', 'MutableMapping', 'Iterable', 'Callable'):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))


def apply() -> None:
    """Idempotent hook for callers that want to be explicit; the shims apply on import."""
