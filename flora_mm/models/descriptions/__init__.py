"""Backbone descriptions (see ``base``): flora_mm's own backbones here; OpenMMLab's and timm's
beside them, registered by import path so that nothing is imported before it is used."""
from .base import (BackboneDescription, Export, LayerDecayError, class_path, describe,
                   register_description)
from . import flora_mm_backbones, openmmlab  # noqa: F401,E402  (register the descriptions)

__all__ = ['BackboneDescription', 'Export', 'LayerDecayError', 'class_path', 'describe',
           'register_description']
