"""Work-arounds the pinned OpenMMLab stack needs on Python 3.11 / torch 2.14.

Imported by ``flora_mm/__init__.py`` before any OpenMMLab package, so that a config's
``custom_imports=['flora_mm']`` or ``import flora_mm`` is enough. Nothing here edits an installed
package: each shim only adds what the old package expects to find, or uses the package's own
extension points.

1. mmrotate 1.0.0rc1 does ``from collections import Sequence`` (removed in Python 3.10): the
   ``collections.abc`` names are aliased into ``collections``.
2. mmengine 0.10.7's local checkpoint loader calls ``torch.load(path)``, which torch >= 2.6 runs
   as ``weights_only=True`` unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set, and whose errors
   do not name the file. It is re-registered (mmengine's ``CheckpointLoader.register_scheme``,
   process-wide) with ``flora_mm.checkpoint.safe_load_from_local``, which only makes
   loading safer: it passes ``weights_only=True`` explicitly (the environment variable cannot
   turn it off) and names the file and the refused global in its errors. It allows nothing
   beyond torch's own list, so for other code the same files load with the same result. The
   extra objects of mmengine's own checkpoints (numpy metadata, HistoryBuffer) are allowed only
   inside ``flora_mm.checkpoint.mmengine_checkpoint_globals()``, a scoped context the tools enter;
   the checkpoints flora_mm writes need none of them (FLoRAHook stores plain values).
3. mmengine imports ``pkg_resources`` (setuptools pinned below 81 for it) to resolve
   ``mmdet::``-style config bases; its deprecation warning on every import is silenced.
"""
import collections
import collections.abc
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

for _name in ('Sequence', 'Mapping', 'MutableMapping', 'Iterable', 'Callable'):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))


def _register_local_checkpoint_loader() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    from .checkpoint.safe_load import safe_load_from_local

    def load_from_local(filename, map_location):  # name matters: mmengine logs name[10:]
        return safe_load_from_local(filename, map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


_register_local_checkpoint_loader()
