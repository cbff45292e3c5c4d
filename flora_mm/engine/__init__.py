from .flora_hook import FLoRAHook
from .optim_constructor import LayerDecayOptimWrapperConstructor
from ..peft.inspection import parameter_table, update_norms  # re-exported (former home)

__all__ = ['FLoRAHook', 'LayerDecayOptimWrapperConstructor', 'parameter_table', 'update_norms']
