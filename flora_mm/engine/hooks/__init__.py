"""The PEFT run's hooks, one concern each (mmengine style); ``FLoRAHook`` composes them."""
from .adapter_checkpoint import AdapterCheckpointHook, adapter_path
from .exact_resume import ExactResumeHook
from .finite import FiniteCheckHook
from .frozen_weights import FrozenWeightsHook
from .inject import AdapterInjectionHook
from .plain_checkpoint import PlainCheckpointHook
from .trainable import TrainableSetHook
from .update_norm import UpdateNormHook

__all__ = ['AdapterCheckpointHook', 'adapter_path', 'ExactResumeHook', 'FiniteCheckHook',
           'FrozenWeightsHook', 'AdapterInjectionHook', 'PlainCheckpointHook',
           'TrainableSetHook', 'UpdateNormHook']
