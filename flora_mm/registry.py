"""Registries.

Models and hooks go into mmengine's ROOT registries: mmdet, mmseg and mmrotate registries are
children of those roots, and a child looks names up in its parents, so `type='PEFTBackbone'` or
`type='FLoRAHook'` resolves whatever the config's `default_scope` is. PEFT methods get a registry
of their own so users can register new methods without touching flora_mm.
"""
from mmengine.registry import HOOKS, MODELS, Registry

PEFT_METHODS = Registry('peft method', scope='flora_mm', locations=['flora_mm.peft'])

__all__ = ['MODELS', 'HOOKS', 'PEFT_METHODS']
