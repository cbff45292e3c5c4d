from ..peft.inspection import parameter_table, update_norms  # re-exported (former home)
from .checkpoint import (CheckpointError, UnsafeCheckpointError, find_resumable_checkpoint,
                         load_checkpoint_file, mmengine_checkpoint_globals)
from .flora_hook import FLoRAHook

__all__ = ['FLoRAHook', 'parameter_table', 'update_norms', 'CheckpointError',
           'UnsafeCheckpointError', 'find_resumable_checkpoint', 'load_checkpoint_file',
           'mmengine_checkpoint_globals']
