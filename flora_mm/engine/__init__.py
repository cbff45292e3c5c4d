from .flora_hook import FLoRAHook, parameter_table, update_norms

__all__ = ['FLoRAHook', 'parameter_table', 'update_norms']
from . import fsdp  # noqa: F401,E402  (registers FullyShardedModel and FSDPRunner)
