"""Layer-wise / stage-wise learning-rate decay for any described backbone.

The references' recipes decay the learning rate with depth: mmdet's and mmseg's
``LearningRateDecayOptimizerConstructor`` for ConvNeXt and InternVL's
``CustomLayerDecayOptimizerConstructor`` (BEiT's) for InternViT-6B. Those constructors parse
one naming (mmpretrain's ConvNeXt, BEiT's ViT) and fail or assign wrong ids on others. Here the
layer id of each backbone parameter comes from the backbone's description
(``flora_mm.models.describe(backbone).layer_id``: the references' rules on each backbone's own
names, see docs/backbones.md), with the references' semantics around it:

- ``num_layers`` (config value) + 2 groups; a parameter with layer id ``i`` gets
  ``lr = base_lr * decay_rate ** (num_layers + 2 - i - 1)``: everything outside the backbone's
  layers (neck, heads, the backbone's new output norms / simple FPN) keeps ``base_lr``.
- Weight decay 0 for 1-D parameters (norms, layer scales, DoRA's magnitude) and biases, as all
  three references do; everything else gets the optimizer's ``weight_decay``. (The references'
  extra ``name in ('pos_embed', 'cls_token')`` test compares model-level names, which start
  with ``backbone.``, so it never fires there: InternViT's position embedding and class token
  are decayed, here as there.)
- Adapter tensors (``flora_core``, ``flora_factors.N``, ``lora_A``, ``lora_B``,
  ``dora_magnitude``) sit under the name of the layer they adapt, so they take its layer id.
- Frozen parameters are left out of the optimizer, as the references do.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..models import describe

DECAY_TYPES = ('layer_wise', 'stage_wise')


def layer_ids(module: nn.Module, decay_type: str, num_layers: int) -> dict[str, tuple[int, bool]]:
    """(layer id, whether it is a pretrained layer of the backbone) of every parameter of a
    detector / segmentor ``module``, by name; outside the backbone: the heads' id."""
    backbone = getattr(module, 'backbone', None)
    if backbone is None:
        raise TypeError(f'{type(module).__name__} has no .backbone: layer-wise decay '
                        'needs a detector or segmentor model')
    description = describe(backbone)
    description.check_decay_type(decay_type)
    ids = {}
    for name, _ in module.named_parameters():
        if name.startswith('backbone.'):
            ids[name] = description.layer_id(name[len('backbone.'):], num_layers, decay_type)
        else:
            ids[name] = (num_layers + 1, False)
    return ids


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Per-layer learning rates and weight-decay exclusions (see the module docstring).

    ``paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=12)``: the keys
    and meaning of mmdet's/mmseg's ``LearningRateDecayOptimizerConstructor``; InternVL's
    ``layer_decay_rate`` is ``decay_rate`` with ``decay_type='layer_wise'``. Registered in
    mmengine's root registry under its own name, so the mmdet, mmseg and mmrotate scopes all
    find it and none of their own constructors is shadowed.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        cfg = dict(paramwise_cfg or {})
        unknown = set(cfg) - {'decay_rate', 'decay_type', 'num_layers'}
        if unknown:
            raise ValueError(f'LayerDecayOptimWrapperConstructor: unknown paramwise_cfg key(s) '
                             f'{sorted(unknown)}; it takes decay_rate, decay_type, num_layers')
        missing = {'decay_rate', 'num_layers'} - set(cfg)
        if missing:
            raise ValueError(f'LayerDecayOptimWrapperConstructor needs paramwise_cfg '
                             f'{sorted(missing)}')
        cfg.setdefault('decay_type', 'layer_wise')
        if cfg['decay_type'] not in DECAY_TYPES:
            raise ValueError(f'decay_type must be one of {DECAY_TYPES}, '
                             f'got {cfg["decay_type"]!r}')
        rate, num = cfg['decay_rate'], cfg['num_layers']
        if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f'decay_rate must be in (0, 1], got {rate!r}')
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f'num_layers must be an integer >= 1, got {num!r}')
        super().__init__(optim_wrapper_cfg, cfg)

    def add_params(self, params: list[dict], module: nn.Module, **kwargs: Any) -> None:
        """Append one param group per (layer id, decay / no decay) to ``params``."""
        decay_type = self.paramwise_cfg['decay_type']
        num_layers = self.paramwise_cfg['num_layers']
        rate = self.paramwise_cfg['decay_rate']
        ids = layer_ids(module, decay_type, num_layers)
        backbone = module.backbone
        groups: dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer_id, is_layer = ids[name]
            if is_layer and layer_id > num_layers:
                raise ValueError(
                    f'num_layers={num_layers} is too small for {type(backbone).__name__}: '
                    f'{name} gets layer id {layer_id} (> num_layers), so it would train '
                    f'at the learning rate of the heads; raise num_layers to {layer_id} or more')
            no_decay = param.ndim == 1 or name.endswith('.bias')
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = rate ** (num_layers + 2 - layer_id - 1)
                group = dict(params=[], param_names=[], lr=self.base_lr * scale, lr_scale=scale,
                             group_name=key)
                if no_decay:
                    group['weight_decay'] = 0.0
                elif self.base_wd is not None:
                    group['weight_decay'] = self.base_wd
                groups[key] = group
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        params.extend(groups.values())
        summary = ', '.join(f'{k}: {len(g["params"])} tensors lr x{g["lr_scale"]:.3g}'
                            for k, g in sorted(groups.items(),
                                               key=lambda kv: -kv[1]['lr_scale']))
        print_log(f'{decay_type} lr decay {rate} over {num_layers} layers '
                  f'({type(backbone).__name__}): {summary}', logger='current')
