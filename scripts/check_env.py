"""The check an environment must pass before it counts as built (scripts/setup_env.sh) or
installed (scripts/install_offline.sh): every OpenMMLab package imports and mmcv's compiled
ops compute. Run it from outside a checkout to check an installed flora_mm."""
import flora_mm  # noqa: F401  (applies the compatibility shims first)
from mmcv.ops import RoIAlign, RoIAlignRotated, nms, nms_rotated  # noqa: F401  (compiled ops)
import mmcv
import mmdet
import mmengine  # noqa: F401
import mmrotate
import mmseg
import timm
import torch
from mmcv.ops import box_iou_rotated

b = torch.tensor([[10., 10., 8., 4., 0.3]])
assert abs(float(box_iou_rotated(b, b)) - 1.0) < 1e-5
print('env ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__,
      'mmseg', mmseg.__version__, 'mmrotate', mmrotate.__version__, 'timm', timm.__version__)
