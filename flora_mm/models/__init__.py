"""Backbones registered in mmengine's root MODELS registry (see flora_mm.registry)."""
from .convnextv2 import ConvNeXtV2
from .descriptions import (BackboneDescription, Export, LayerDecayError, describe,
                           register_description)
from .internvit import InternViT
from .meta import meta_device
from .peft_backbone import build_peft_backbone

__all__ = ['ConvNeXtV2', 'InternViT', 'build_peft_backbone', 'BackboneDescription',
           'Export', 'LayerDecayError', 'describe', 'meta_device', 'register_description']
