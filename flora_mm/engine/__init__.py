from ..peft.inspection import parameter_table, update_norms  # re-exported (former home)
from .checkpoint import (CheckpointError, UnsafeCheckpointError, find_resumable_checkpoint,
                         load_checkpoint_file, mmengine_checkpoint_globals)
from .flora_hook import FLoRAHook
from .optim_constructor import LayerDecayOptimWrapperConstructor
from . import fsdp  # noqa: F401,E402  (registers FullyShardedModel and FSDPRunner)

__all__ = ['FLoRAHook', 'LayerDecayOptimWrapperConstructor', 'parameter_table', 'update_norms',
           'CheckpointError', 'UnsafeCheckpointError', 'find_resumable_checkpoint',
           'load_checkpoint_file', 'mmengine_checkpoint_globals']
