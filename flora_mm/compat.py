"""Work-arounds the pinned OpenMMLab stack needs on Python 3.11 / torch 2.14.

Imported by ``flora_mm/__init__.py`` before any OpenMMLab package, so that a config's
``custom_imports=['flora_mm']`` or ``import flora_mm`` is enough. Nothing here edits an installed
package: each shim only adds what the old package expects to find, or uses the package's own
extension points.

1. mmrotate 1.0.0rc1 does ``from collections import Sequence`` (removed in Python 3.10): the
   ``collections.abc`` names are aliased into ``collections``.
2. mmengine 0.10.7 calls ``torch.load(path)``; since torch 2.6 that means ``weights_only=True``,
   which refuses mmengine's own checkpoints (they carry message-hub state and numpy metadata),
   so ``--resume`` and ``load_from`` fail. mmengine's local-file loader is re-registered through
   its ``CheckpointLoader.register_scheme`` hook with the pre-2.6 behaviour (``weights_only=False``)
   — as before torch 2.6, load only checkpoints you trust.
3. mmengine imports ``pkg_resources`` (setuptools pinned below 81 for it) to resolve
   ``mmdet::``-style config bases; its deprecation warning on every import is silenced.
"""
import collections
import collections.abc
import os.path as osp
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

for _name in ('Sequence', 'Mapping', 'MutableMapping', 'Iterable', 'Callable'):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))


def _register_local_checkpoint_loader() -> None:
    import torch
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename, map_location):  # name matters: mmengine logs name[10:]
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(filename, map_location=map_location, weights_only=False)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


_register_local_checkpoint_loader()
