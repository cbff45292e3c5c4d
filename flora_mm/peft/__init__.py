"""PEFT methods: FLoRA and the baselines it is compared with, all on one mechanism."""
from .api import (adapter_layers, adapter_state_dict, build_peft_method, count_parameters,
                  inject_adapters, injected_roots, load_adapter_state_dict, merge_adapters,
                  remove_adapters, reset_adapters_from_base, unmerge_adapters)
from .base import LAYER_KINDS, AdapterLayer, PEFTConfigError, PEFTMethod, TargetSpec
from .dora import DoRA, DoRALayer
from .flora import FLoRA, FLoRALayer, tucker_product
from .lora import LoRA, LoRALayer
from .simple import BitFit, Frozen, Full

__all__ = [
    'inject_adapters', 'merge_adapters', 'unmerge_adapters', 'adapter_state_dict',
    'load_adapter_state_dict', 'count_parameters', 'build_peft_method', 'remove_adapters',
    'reset_adapters_from_base', 'adapter_layers', 'injected_roots', 'AdapterLayer', 'PEFTMethod',
    'PEFTConfigError', 'TargetSpec', 'LAYER_KINDS', 'FLoRA', 'FLoRALayer', 'tucker_product',
    'LoRA', 'LoRALayer', 'DoRA', 'DoRALayer', 'BitFit', 'Full', 'Frozen',
]
