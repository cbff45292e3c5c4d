from .flora_hook import FLoRAHook, parameter_table, update_norms
from .optim_constructor import LayerDecayOptimWrapperConstructor

__all__ = ['FLoRAHook', 'LayerDecayOptimWrapperConstructor', 'parameter_table', 'update_norms']
