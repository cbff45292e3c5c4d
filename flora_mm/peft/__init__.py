"""PEFT methods: FLoRA and the baselines it is compared with, all on one mechanism."""
from .api import (adapter_layers, adapter_state_dict, build_peft_method, count_parameters,
                  inject_adapters, inject_into_parts, injected_methods, injected_roots,
                  load_adapter_state_dict,
                  merge_adapters, normalize_parts, remove_adapters, reset_adapters_from_base,
                  unmerge_adapters, unmerged)
from .base import (LAYER_KINDS, AdapterLayer, InjectionState, LinearFactors, PEFTConfigError,
                   PEFTMethod, TargetSpec, injection_state)
from .dora import DoRA, DoRALayer
from .flora import FLoRA, FLoRALayer, tucker_product
from .inspection import (DEFAULT_GROUP, format_table, parameter_table, unexpected_trainable,
                         update_norms)
from .locon import LoCon, LoConLayer
from .loha import LoHa, LoHaLayer
from .lokr import LoKr, LoKrLayer
from .lora import LoRA, LoRALayer
from .simple import BitFit, Frozen, Full

__all__ = [
    'inject_adapters', 'inject_into_parts', 'normalize_parts', 'merge_adapters',
    'unmerge_adapters', 'unmerged', 'adapter_state_dict', 'load_adapter_state_dict',
    'count_parameters', 'build_peft_method', 'remove_adapters', 'reset_adapters_from_base',
    'adapter_layers', 'injected_methods', 'injected_roots', 'injection_state', 'InjectionState',
    'AdapterLayer',
    'LinearFactors',
    'PEFTMethod', 'PEFTConfigError', 'TargetSpec', 'LAYER_KINDS', 'FLoRA', 'FLoRALayer',
    'tucker_product', 'LoRA', 'LoRALayer', 'DoRA', 'DoRALayer', 'BitFit', 'Full', 'Frozen',
    'LoCon', 'LoConLayer', 'LoHa', 'LoHaLayer', 'LoKr', 'LoKrLayer',
    'parameter_table', 'format_table', 'unexpected_trainable', 'update_norms', 'DEFAULT_GROUP',
]
