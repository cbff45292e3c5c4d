from .checkpoint import (CheckpointError, UnsafeCheckpointError, find_resumable_checkpoint,
                         load_checkpoint_file, mmengine_checkpoint_globals)
from .flora_hook import FLoRAHook, parameter_table, update_norms

__all__ = ['FLoRAHook', 'parameter_table', 'update_norms', 'CheckpointError',
           'UnsafeCheckpointError', 'find_resumable_checkpoint', 'load_checkpoint_file',
           'mmengine_checkpoint_globals']
