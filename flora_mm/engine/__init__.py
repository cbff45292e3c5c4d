"""Training-time machinery: the PEFT run's hooks, the layer-decay optimizer constructor and
sharded training (registered in mmengine's registries on import)."""
from .flora_hook import FLoRAHook
from .hooks import (AdapterCheckpointHook, AdapterInjectionHook, ExactResumeHook,
                    FiniteCheckHook, FrozenWeightsHook, PlainCheckpointHook, TrainableSetHook,
                    UpdateNormHook)
from .optim_constructor import LayerDecayOptimWrapperConstructor
from . import fsdp  # noqa: F401,E402  (registers FullyShardedModel and FSDPRunner)

__all__ = ['FLoRAHook', 'AdapterCheckpointHook', 'AdapterInjectionHook', 'ExactResumeHook',
           'FiniteCheckHook', 'FrozenWeightsHook', 'PlainCheckpointHook', 'TrainableSetHook',
           'UpdateNormHook', 'LayerDecayOptimWrapperConstructor']
