"""flora_mm: FLoRA and PEFT baselines for OpenMMLab backbones."""
from . import compat  # noqa: F401  (must run before any OpenMMLab import)

__version__ = '0.1.0'
