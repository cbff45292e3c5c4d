from .flora_hook import FLoRAHook, parameter_table, update_norms

__all__ = ['FLoRAHook', 'parameter_table', 'update_norms']
