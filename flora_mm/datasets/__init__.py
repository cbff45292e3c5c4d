"""Dataset helpers: deterministic tiny datasets in the real COCO / ADE20K / DOTA formats."""
from .tiny import (ADE_CLASSES, ADE_LABELS, COCO_CATEGORIES, COCO_CLASSES, DEFAULT_ROOT,
                   DOTA_CLASSES, TASKS, generate, generate_ade20k, generate_coco, generate_dota)

__all__ = [
    'ADE_CLASSES', 'ADE_LABELS', 'COCO_CATEGORIES', 'COCO_CLASSES', 'DEFAULT_ROOT',
    'DOTA_CLASSES', 'TASKS', 'generate', 'generate_ade20k', 'generate_coco', 'generate_dota'
]
