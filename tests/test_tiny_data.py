"""The tiny datasets are deterministic and load in the REAL OpenMMLab datasets, pipelines and
metrics (the wheels' own dataset base configs), and perfect predictions score perfectly.

Why: the demo and the training tests rely on these files being valid COCO / ADE20K / DOTA; a
metric of 1.0 on predictions built from the ground truth shows annotations, image sizes, ids
and class mappings agree across dataset, pipeline and metric.
"""
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

import flora_mm  # noqa: F401  (compat shims before mmrotate)
from flora_mm.datasets import tiny
from flora_mm.utils import register_task_modules

cv2 = pytest.importorskip('cv2')
torch = pytest.importorskip('torch')
from mmengine.config import Config  # noqa: E402
from mmengine.evaluator import Evaluator  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402

NUM_TRAIN, NUM_VAL = 5, 6


@pytest.fixture(scope='session')
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('tiny')
    tiny.generate(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL)
    return root


def _wheel_config(package: str, rel: str) -> Config:
    mod = __import__(package)
    return Config.fromfile(str(Path(mod.__file__).parent / '.mim' / 'configs' / rel))


def _files(root: Path) -> list:
    return sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file())


# --------------------------------------------------------------------------- generator
def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, tiny_root):
    again = tmp_path / 'again'
    tiny.generate(again, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL)
    files = _files(tiny_root)
    assert files == _files(again)
    _, mismatch, errors = filecmp.cmpfiles(tiny_root, again, [str(f) for f in files],
                                           shallow=False)
    assert not mismatch and not errors
    other = tmp_path / 'other'
    tiny.generate_coco(other, seed=1, num_train=NUM_TRAIN, num_val=NUM_VAL)
    ann = 'coco/annotations/instances_train2017.json'
    assert (other / ann).read_bytes() != (tiny_root / ann).read_bytes()


def test_regenerate_replaces_atomically(tmp_path):
    tiny.generate_dota(tmp_path, num_train=2, num_val=1)
    stale = tmp_path / 'split_ss_dota' / 'trainval' / 'annfiles' / 'stale.txt'
    stale.write_text('')
    tiny.generate_dota(tmp_path, num_train=2, num_val=1)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['split_ss_dota']  # no temp leftovers


def test_coco_json_is_complete(tiny_root):
    ann = json.loads((tiny_root / 'coco/annotations/instances_train2017.json').read_text())
    assert set(ann) == {'info', 'licenses', 'images', 'annotations', 'categories'}
    # all 80 COCO categories with their real ids, as in the real files; three occur
    from mmdet.datasets import CocoDataset
    assert [c['name'] for c in ann['categories']] == list(CocoDataset.METAINFO['classes'])
    assert ann['categories'][-1]['id'] == 90
    used = {a['category_id'] for a in ann['annotations']}
    assert used == {c['id'] for c in ann['categories'] if c['name'] in tiny.COCO_CLASSES}
    assert len(ann['images']) == NUM_TRAIN
    image_ids = {im['id'] for im in ann['images']}
    assert len({a['id'] for a in ann['annotations']}) == len(ann['annotations'])
    for a in ann['annotations']:
        assert a['image_id'] in image_ids and a['iscrowd'] == 0 and a['area'] > 0
        x, y, w, h = a['bbox']
        poly = np.asarray(a['segmentation'][0]).reshape(-1, 2)
        assert np.allclose([x, y, x + w, y + h], [*poly.min(0), *poly.max(0)])
    for im in ann['images']:
        img = cv2.imread(str(tiny_root / 'coco/train2017' / im['file_name']))
        assert img.shape == (im['height'], im['width'], 3)


def _mean_rgb(img_bgr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return img_bgr[mask.astype(bool)][:, ::-1].mean(0)


def test_object_colour_gives_the_class(tiny_root):
    """Learnability: each annotated region has its class's colour (up to jitter + JPEG)."""
    from pycocotools.coco import COCO
    coco = COCO(str(tiny_root / 'coco/annotations/instances_val2017.json'))
    colours = {c['id']: rgb for c, rgb, _ in tiny._COCO_SPECS}
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        img = cv2.imread(str(tiny_root / 'coco/val2017' / info['file_name']))
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            mean = _mean_rgb(img, coco.annToMask(a))
            assert np.abs(mean - colours[a['category_id']]).max() < 40

    colours = {name: rgb for name, (rgb, _, _) in tiny._DOTA_SPECS.items()}
    for txt in (tiny_root / 'split_ss_dota/test/annfiles').glob('*.txt'):
        img = cv2.imread(str(txt.parents[1] / 'images' / f'{txt.stem}.png'))
        for line in txt.read_text().splitlines():
            parts = line.split()
            assert len(parts) == 10 and parts[9] == '0'
            mask = np.zeros(img.shape[:2], np.uint8)
            tiny._fill_polygon(mask, np.array(parts[:8], float), 1)
            assert np.abs(_mean_rgb(img, mask) - colours[parts[8]]).max() < 40


# --------------------------------------------------------------------------- COCO
@pytest.mark.parametrize('classes', [tiny.COCO_CLASSES, None], ids=['tiny-classes', 'coco80'])
def test_coco_dataset_and_perfect_metric(tiny_root, classes):
    from mmdet.registry import DATASETS, METRICS
    register_task_modules('mmdet')
    cfg = _wheel_config('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    data_root = str(tiny_root / 'coco') + '/'
    ds_cfg = cfg.val_dataloader.dataset
    ds_cfg.update(data_root=data_root)
    evaluator_cfg = dict(cfg.val_evaluator, ann_file=data_root + ds_cfg.ann_file)
    assert evaluator_cfg['metric'] == ['bbox', 'segm']
    if classes is not None:
        ds_cfg.metainfo = dict(classes=classes)
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = DATASETS.build(ds_cfg)
        evaluator = Evaluator(METRICS.build(evaluator_cfg))
    evaluator.dataset_meta = dataset.metainfo
    assert len(dataset) == NUM_VAL

    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        gt = sample.gt_instances
        assert len(gt) >= 1 and set(gt.labels.tolist()) <= {0, 1, 2}
        assert gt.masks.masks.shape[1:] == tuple(sample.ori_shape) == (96, 128)
        sample.pred_instances = InstanceData(
            bboxes=gt.bboxes.clone(), labels=gt.labels.clone(),
            scores=torch.ones(len(gt)), masks=torch.from_numpy(gt.masks.masks.astype(bool)))
        evaluator.process([sample])
    metrics = evaluator.evaluate(len(dataset))
    assert metrics['coco/bbox_mAP'] == pytest.approx(1.0)
    assert metrics['coco/segm_mAP'] == pytest.approx(1.0)


def test_coco_train_pipeline(tiny_root):
    from mmdet.registry import DATASETS
    register_task_modules('mmdet')
    cfg = _wheel_config('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    ds_cfg = cfg.train_dataloader.dataset
    ds_cfg.update(data_root=str(tiny_root / 'coco') + '/', metainfo=dict(classes=tiny.COCO_CLASSES))
    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == NUM_TRAIN
    item = dataset[0]
    assert item['inputs'].shape[0] == 3 and len(item['data_samples'].gt_instances) >= 1


def _val_set(scope: str, config: str, datasets, metrics, classes, **dataset_options):
    """The package's own validation dataset (its config from the wheel, pointed at the tiny
    data) and evaluator, with ``classes`` as metainfo if given."""
    register_task_modules(scope)
    cfg = _wheel_config(scope, config)
    ds_cfg = cfg.val_dataloader.dataset
    ds_cfg.update(dataset_options)
    if classes is not None:
        ds_cfg.metainfo = dict(classes=classes)
    with DefaultScope.overwrite_default_scope(scope):
        dataset = datasets.build(ds_cfg)
        evaluator = Evaluator(metrics.build(cfg.val_evaluator))
    evaluator.dataset_meta = dataset.metainfo
    return dataset, evaluator


# --------------------------------------------------------------------------- ADE20K
@pytest.mark.parametrize('classes', [None, tiny.ADE_CLASSES], ids=['ade150', 'tiny-classes'])
def test_ade20k_dataset_and_perfect_metric(tiny_root, classes):
    from mmseg.registry import DATASETS, METRICS
    dataset, evaluator = _val_set('mmseg', 'upernet/upernet_r50_4xb4-80k_ade20k-512x512.py',
                                  DATASETS, METRICS, classes,
                                  data_root=str(tiny_root / 'ade' / 'ADEChallengeData2016'))
    assert dataset.reduce_zero_label and len(dataset) == NUM_VAL
    assert len(dataset.metainfo['classes']) == (150 if classes is None else 4)

    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        seg = sample.gt_sem_seg.data
        assert tuple(seg.shape[-2:]) == tuple(sample.ori_shape) == (96, 128)
        values = set(seg.unique().tolist())
        assert values <= {0, 1, 2, 3, 255}
        seen |= values
        sample.pred_sem_seg = PixelData(data=seg.clone())
        evaluator.process([sample])
    assert {1, 2, 3, 255} <= seen  # building, sky, floor and ignored "other" all occur
    metrics = evaluator.evaluate(len(dataset))
    assert metrics['mIoU'] == pytest.approx(100.0)


# --------------------------------------------------------------------------- DOTA
@pytest.mark.parametrize('classes', [None, tiny.DOTA_CLASSES], ids=['dota15', 'tiny-classes'])
def test_dota_dataset_and_perfect_metric(tiny_root, classes, dota_metric_in_threads):
    from mmrotate.registry import DATASETS, METRICS
    from mmrotate.structures.bbox import RotatedBoxes
    dataset, evaluator = _val_set('mmrotate',
                                  'oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py',
                                  DATASETS, METRICS, classes,
                                  data_root=str(tiny_root / 'split_ss_dota') + '/',
                                  ann_file='test/annfiles/',
                                  data_prefix=dict(img_path='test/images/'), img_shape=(128, 128))
    assert len(dataset) == NUM_VAL
    names = dataset.metainfo['classes']
    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        gt = sample.gt_instances
        assert isinstance(gt.bboxes, RotatedBoxes) and len(gt) >= 2
        assert {names[k] for k in gt.labels.tolist()} <= set(tiny.DOTA_CLASSES)
        w, h = gt.bboxes.tensor[:, 2], gt.bboxes.tensor[:, 3]
        assert bool((torch.maximum(w, h) <= 45).all() and (torch.minimum(w, h) >= 6).all())
        sample.pred_instances = InstanceData(
            bboxes=gt.bboxes.tensor.clone(), labels=gt.labels.clone(), scores=torch.ones(len(gt)))
        evaluator.process([sample])
    metrics = evaluator.evaluate(len(dataset))
    assert metrics['dota/mAP'] == pytest.approx(1.0)
