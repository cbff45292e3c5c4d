"""Environment guard: the pinned OpenMMLab stack builds and runs its own reference models.

Each test loads the package's OWN config from inside its wheel (``<pkg>/.mim/configs``), shrinks
the backbone and heads to a few channels, and runs one loss step (backward, finite loss,
gradients reach the backbone) and one predict step on CPU through the model's own
data_preprocessor. Why: an environment that installs but cannot run Mask R-CNN, UperNet or
Oriented R-CNN (missing compiled ops, numpy/torch API drift, Python 3.11 removals) must fail
here, in seconds, rather than in a long training job.
"""
from pathlib import Path

import pytest

import flora_mm  # noqa: F401  (compat shims must precede the mmrotate import)
from flora_mm.apis import replace_sync_bn
from flora_mm.utils import register_task_modules

from .conftest import loss_backward

torch = pytest.importorskip('torch')
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402

CHANNELS = [8, 16, 32, 64]  # ResNet-18 (BasicBlock, expansion 1) with base_channels=8
NECK = 16


def _wheel_config(package: str, rel: str) -> Config:
    mod = __import__(package)
    path = Path(mod.__file__).parent / '.mim' / 'configs' / rel
    assert path.is_file(), f'{package} wheel lacks its config {rel}'
    return Config.fromfile(str(path))


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _loss_and_predict(model, data: dict, probe: torch.nn.Parameter) -> list:
    """One training loss + backward, then one predict; returns the predicted data samples."""
    loss_backward(model, data)
    assert probe.grad is not None and torch.isfinite(probe.grad).all()
    assert probe.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        return model.test_step(data)


def test_compiled_ops_import_and_run():
    from mmcv.ops import RoIAlignRotated, nms, nms_rotated
    boxes = torch.tensor([[10., 10., 8., 4., 0.3], [10.5, 10., 8., 4., 0.3],
                          [30., 30., 6., 6., 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms_rotated(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]
    _, keep = nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]),
                  torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]
    roi = RoIAlignRotated(output_size=3, spatial_scale=1.0, sampling_ratio=2, clockwise=True)
    out = roi(torch.rand(1, 4, 32, 32), torch.tensor([[0., 16., 16., 10., 6., 0.5]]))
    assert out.shape == (1, 4, 3, 3) and torch.isfinite(out).all()


def test_mask_rcnn_mmdet():
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    register_task_modules('mmdet')

    cfg = _wheel_config('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    m = cfg.model
    m.backbone.update(depth=18, base_channels=8, init_cfg=None)
    m.neck.update(in_channels=CHANNELS, out_channels=NECK)
    m.rpn_head.update(in_channels=NECK, feat_channels=NECK)
    m.roi_head.bbox_roi_extractor.out_channels = NECK
    m.roi_head.bbox_head.update(in_channels=NECK, fc_out_channels=32, num_classes=3)
    m.roi_head.mask_roi_extractor.out_channels = NECK
    m.roi_head.mask_head.update(in_channels=NECK, conv_out_channels=NECK, num_classes=3)
    m.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    m.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    m.test_cfg.rcnn.max_per_img = 20
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(m)

    h, w = 64, 96
    samples = []
    for boxes, labels in (([[8., 8., 40., 30.], [50., 20., 90., 60.]], [0, 2]),
                          ([[20., 10., 60., 50.]], [1])):
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            masks[k, int(y1):int(y2), int(x1):int(x2)] = 1
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                        scale_factor=(1., 1.)))
        s.gt_instances = InstanceData(bboxes=torch.tensor(boxes), labels=torch.tensor(labels),
                                      masks=BitmapMasks(masks.numpy(), h, w))
        samples.append(s)
    data = dict(inputs=[_image(h, w, 0), _image(h, w, 1)], data_samples=samples)

    preds = _loss_and_predict(model, data, model.backbone.layer4[0].conv1.weight)
    assert len(preds) == 2
    p = preds[0].pred_instances
    assert p.bboxes.shape[-1] == 4 and len(p.scores) == len(p.labels) == len(p.masks)
    if len(p.masks):
        assert tuple(p.masks.shape[-2:]) == (h, w)


def test_upernet_mmseg():
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    register_task_modules('mmseg')

    cfg = _wheel_config('mmseg', 'upernet/upernet_r50_4xb4-80k_ade20k-512x512.py')
    m = cfg.model
    replace_sync_bn(m)
    m.pretrained = None
    m.data_preprocessor.size = (64, 64)
    m.backbone.update(depth=18, stem_channels=8, base_channels=8)
    m.decode_head.update(in_channels=CHANNELS, channels=NECK, num_classes=4)
    m.auxiliary_head.update(in_channels=CHANNELS[2], channels=8, num_classes=4)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(m)
    assert type(model.decode_head).__name__ == 'UPerHead'

    h, w = 56, 64  # padded to the preprocessor's 64x64
    samples = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        seg = torch.randint(0, 4, (1, h, w), generator=g)
        seg[:, :4] = 255  # ignored pixels
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=seg)
        samples.append(s)
    data = dict(inputs=[_image(h, w, 2), _image(h, w, 3)], data_samples=samples)

    preds = _loss_and_predict(model, data, model.backbone.stem[0].weight)
    assert len(preds) == 2
    seg = preds[0].pred_sem_seg.data
    assert tuple(seg.shape) == (1, h, w) and int(seg.max()) < 4


def test_oriented_rcnn_le90_mmrotate():
    from mmdet.structures import DetDataSample
    from mmrotate.registry import MODELS
    from mmrotate.structures.bbox import RotatedBoxes
    register_task_modules('mmrotate')

    cfg = _wheel_config('mmrotate', 'oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py')
    m = cfg.model
    assert m.rpn_head.bbox_coder.angle_version == 'le90'
    m.backbone.update(depth=18, base_channels=8, init_cfg=None)
    m.neck.update(in_channels=CHANNELS, out_channels=NECK)
    m.rpn_head.update(in_channels=NECK, feat_channels=NECK)
    m.roi_head.bbox_roi_extractor.out_channels = NECK
    m.roi_head.bbox_head.update(in_channels=NECK, fc_out_channels=32, num_classes=3)
    m.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    m.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    m.test_cfg.rcnn.update(nms_pre=200, max_per_img=20)
    with DefaultScope.overwrite_default_scope('mmrotate'):
        model = MODELS.build(m)

    h = w = 64
    samples = []
    for boxes, labels in (([[20., 20., 24., 8., 0.5], [44., 40., 16., 10., -0.7]], [0, 1]),
                          ([[32., 32., 30., 12., 1.2]], [2])):
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                        scale_factor=(1., 1.)))
        s.gt_instances = InstanceData(bboxes=RotatedBoxes(torch.tensor(boxes)),
                                      labels=torch.tensor(labels))
        samples.append(s)
    data = dict(inputs=[_image(h, w, 4), _image(h, w, 5)], data_samples=samples)

    preds = _loss_and_predict(model, data, model.backbone.layer4[0].conv1.weight)
    assert len(preds) == 2
    p = preds[0].pred_instances
    bboxes = p.bboxes.tensor if hasattr(p.bboxes, 'tensor') else p.bboxes
    assert bboxes.shape[-1] == 5 and len(p.scores) == len(p.labels) == len(bboxes)
