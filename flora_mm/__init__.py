"""flora_mm: FLoRA and PEFT baselines for OpenMMLab backbones.

Importing the package applies the stack's compatibility shims and registers every flora_mm
module, which is what a config's
``custom_imports=dict(imports=['flora_mm'], allow_failed_imports=False)`` relies on.
"""
from . import compat  # noqa: F401  (must run before any OpenMMLab import)
from .registry import HOOKS, MODELS, PEFT_METHODS  # noqa: E402
from . import engine, models, peft  # noqa: E402,F401  (registration on import)

__version__ = '0.1.0'

__all__ = ['HOOKS', 'MODELS', 'PEFT_METHODS', 'peft', 'models', 'engine']
