"""Registering a task package (mmdet, mmseg, mmrotate) for a config's ``default_scope``."""
from __future__ import annotations

SCOPES = ('mmdet', 'mmseg', 'mmrotate')


def register_task_modules(scope: str) -> None:
    """Register the task package's modules without initialising the default scope.

    mmrotate configs use ``mmdet.*`` modules, so mmdet is registered for them too (as
    mmrotate's own tools do).
    """
    if scope not in SCOPES:
        raise ValueError(f'default_scope must be one of {SCOPES}, got {scope!r}')
    if scope in ('mmdet', 'mmrotate'):
        from mmdet.utils import register_all_modules as register_mmdet
        register_mmdet(init_default_scope=False)
    if scope == 'mmseg':
        from mmseg.utils import register_all_modules as register_mmseg
        register_mmseg(init_default_scope=False)
    elif scope == 'mmrotate':
        from mmrotate.utils import register_all_modules as register_mmrotate
        register_mmrotate(init_default_scope=False)
