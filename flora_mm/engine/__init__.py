from .flora_hook import FLoRAHook
from ..peft.inspection import parameter_table, update_norms  # re-exported (former home)

__all__ = ['FLoRAHook', 'parameter_table', 'update_norms']
from . import fsdp  # noqa: F401,E402  (registers FullyShardedModel and FSDPRunner)
