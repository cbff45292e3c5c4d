"""Backbones registered in mmengine's root MODELS registry (see flora_mm.registry)."""
from .convnextv2 import ConvNeXtV2
from .internvit import InternViT

__all__ = ['ConvNeXtV2', 'InternViT']
