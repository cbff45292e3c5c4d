from .flora_hook import FLoRAHook
from .optim_constructor import LayerDecayOptimWrapperConstructor
from ..peft.inspection import parameter_table, update_norms  # re-exported (former home)
from . import fsdp  # noqa: F401,E402  (registers FullyShardedModel and FSDPRunner)

__all__ = ['FLoRAHook', 'LayerDecayOptimWrapperConstructor', 'parameter_table', 'update_norms']
