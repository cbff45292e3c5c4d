"""flora_mm: FLoRA and PEFT baselines for OpenMMLab backbones.

Importing the package applies the stack's compatibility shims and registers every flora_mm
module, which is what a config's
``custom_imports=dict(imports=['flora_mm'], allow_failed_imports=False)`` relies on.
"""
from . import compat  # noqa: F401  (must run before any OpenMMLab import)
from .registry import HOOKS, MODELS, PEFT_METHODS  # noqa: E402
from . import engine, models, peft  # noqa: E402,F401  (registration on import)

__version__ = '0.1.0'


def register_all_modules() -> None:
    """Register flora_mm's modules. Importing flora_mm already does; kept for the OpenMMLab
    convention (``mmdet.utils.register_all_modules``) and explicit call sites."""
    import importlib
    for name in ('flora_mm.peft', 'flora_mm.models', 'flora_mm.engine'):
        importlib.import_module(name)


__all__ = ['HOOKS', 'MODELS', 'PEFT_METHODS', 'register_all_modules', 'peft', 'models', 'engine']
