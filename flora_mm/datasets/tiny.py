"""Deterministic tiny datasets in the real COCO / ADE20K / DOTA on-disk formats.

Why: the tests and the demo must run the real OpenMMLab dataset classes, pipelines and metrics
without downloading anything, and a tiny model has to learn the data in minutes on 2 CPU cores.
So every object's class is a function of its colour (and shape), objects never overlap, and
they sit on dark low-contrast noise.

Determinism: image ``i`` of a split is drawn from its own generator seeded with
``(seed, task, split, i)``, so the same seed gives byte-identical annotation files (and images),
and changing the number of images does not change the ones already there.

Class names are real names of each benchmark, so the tiny data also works with the datasets'
default class lists (unused classes simply never occur):

* COCO: ``person`` (red rectangle), ``bicycle`` (green ellipse), ``car`` (blue rectangle),
  with their real COCO category ids 1, 2, 3.
* ADE20K: label ids 1..4 = ``wall``, ``building``, ``sky``, ``floor`` (the first four of
  mmseg's 150 ADE20K classes); label 0 = "other", ignored with ``reduce_zero_label=True``.
* DOTA: ``plane`` (white, squat), ``ship`` (orange, long and thin), ``small-vehicle`` (cyan,
  small), drawn as rotated rectangles at arbitrary angles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..utils.fileio import atomic_dir

__all__ = [
    'COCO_CATEGORIES', 'COCO_CLASSES', 'ADE_CLASSES', 'ADE_LABELS', 'DOTA_CLASSES', 'TASKS',
    'DEFAULT_ROOT', 'generate_coco', 'generate_ade20k', 'generate_dota', 'generate'
]

DEFAULT_ROOT = 'data/tiny'
TASKS = ('coco', 'ade20k', 'dota')

# (category, RGB colour, shape)
_COCO_SPECS = (
    ({'id': 1, 'name': 'person', 'supercategory': 'person'}, (230, 40, 40), 'rect'),
    ({'id': 2, 'name': 'bicycle', 'supercategory': 'vehicle'}, (40, 220, 40), 'ellipse'),
    ({'id': 3, 'name': 'car', 'supercategory': 'vehicle'}, (50, 80, 240), 'rect'),
)
COCO_CLASSES = tuple(c['name'] for c, _, _ in _COCO_SPECS)

# The real annotation files list all 80 categories with their (non-contiguous) ids, and
# mmdet's CocoMetric maps every predicted label (0..79) through that list: so the tiny json
# lists them all too, even though only the three above occur.
_COCO_80 = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')
_COCO_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
_COCO_SUPER = ((1, 'person'), (9, 'vehicle'), (15, 'outdoor'), (25, 'animal'), (33, 'accessory'),
               (43, 'sports'), (51, 'kitchen'), (61, 'food'), (70, 'furniture'),
               (77, 'electronic'), (82, 'appliance'), (90, 'indoor'))
COCO_CATEGORIES = tuple(
    {'id': cid, 'name': name,
     'supercategory': next(sup for last, sup in _COCO_SUPER if cid <= last)}
    for cid, name in zip(_COCO_IDS, _COCO_80))
assert all(c['id'] == spec['id'] and c['name'] == spec['name']
           for c, (spec, _, _) in zip(COCO_CATEGORIES, _COCO_SPECS))

# ADE20K label id -> (name, RGB colour); 0 is "other" (ignored with reduce_zero_label)
_ADE_SPECS = {
    1: ('wall', (230, 210, 150)),
    2: ('building', (120, 120, 120)),
    3: ('sky', (135, 190, 235)),
    4: ('floor', (140, 90, 50)),
}
_ADE_OTHER_RGB = (220, 0, 220)
ADE_LABELS = {k: name for k, (name, _) in _ADE_SPECS.items()}
ADE_CLASSES = tuple(ADE_LABELS[k] for k in sorted(ADE_LABELS))

# DOTA class -> (RGB colour, (min_w, max_w), (min_h, max_h)), w is the long side
_DOTA_SPECS = {
    'plane': ((245, 245, 245), (20, 30), (16, 24)),
    'ship': ((255, 140, 0), (28, 44), (8, 12)),
    'small-vehicle': ((0, 220, 255), (12, 18), (7, 10)),
}
DOTA_CLASSES = tuple(_DOTA_SPECS)

_TASK_CODE = {'coco': 1, 'ade20k': 2, 'dota': 3}
_SPLIT_CODE = {'train': 0, 'val': 1}


def _rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TASK_CODE[task], _SPLIT_CODE[split], index])


def _bgr(rgb: Sequence[int]) -> tuple[int, int, int]:
    return int(rgb[2]), int(rgb[1]), int(rgb[0])


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int = 15) -> tuple:
    """A colour near the class colour: the class stays obvious, pixels are not constant."""
    c = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return _bgr(c)


def _noise_background(rng: np.random.Generator, h: int, w: int, base: Sequence[int],
                      amplitude: int) -> np.ndarray:
    img = np.asarray(base, dtype=np.int16)[None, None, :] + rng.integers(
        -amplitude, amplitude + 1, (h, w, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _fill_polygon(canvas: np.ndarray, poly: np.ndarray, value) -> None:
    """Fill a polygon given in continuous image coordinates (pixel i spans [i, i + 1]).

    cv2 puts pixel i at integer coordinate i, hence the -0.5; 4 fractional bits keep the
    sub-pixel precision so the drawn pixels match the annotated polygon.
    """
    pts = np.round((poly.reshape(-1, 2) - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_8, shift=4)


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
        f.write(text)


def _imwrite(path: Path, img: np.ndarray, params: Sequence[int] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img, list(params)):
        raise OSError(f'cv2.imwrite failed for {path}')


# --------------------------------------------------------------------------- COCO
def _place_boxes(rng: np.random.Generator, n: int, h: int, w: int, size: tuple[int, int],
                 margin: int = 3, tries: int = 100) -> list[tuple[int, int, int, int]]:
    """Up to ``n`` non-overlapping integer boxes (x, y, bw, bh) with ``margin`` px between."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(tries):
        if len(boxes) == n:
            break
        bw, bh = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
        x = int(rng.integers(1, w - bw))
        y = int(rng.integers(1, h - bh))
        if all(x + bw + margin <= bx or bx + bbw + margin <= x or y + bh + margin <= by
               or by + bbh + margin <= y for bx, by, bbw, bbh in boxes):
            boxes.append((x, y, bw, bh))
    return boxes


def _coco_polygon(shape: str, x: int, y: int, bw: int, bh: int) -> np.ndarray:
    if shape == 'rect':
        return np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]], dtype=np.float64)
    # 32 vertices, a multiple of 4, so the extreme points (and so the bbox) are exact
    t = np.arange(32) * (2 * np.pi / 32)
    cx, cy = x + bw / 2, y + bh / 2
    return np.stack([cx + bw / 2 * np.cos(t), cy + bh / 2 * np.sin(t)], axis=1)


def _coco_image(rng: np.random.Generator, h: int, w: int, image_id: int):
    img = _noise_background(rng, h, w, rng.integers(30, 60, 3), amplitude=25)
    anns = []
    n = int(rng.integers(1, 4))
    for k, (x, y, bw, bh) in enumerate(_place_boxes(rng, n, h, w, size=(16, 40))):
        cls = int(rng.integers(len(_COCO_SPECS)))
        cat, rgb, shape = _COCO_SPECS[cls]
        poly = np.round(_coco_polygon(shape, x, y, bw, bh), 2)
        _fill_polygon(img, poly, _jitter(rng, rgb))
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        anns.append({
            'id': image_id * 100 + k + 1,
            'image_id': image_id,
            'category_id': cat['id'],
            'segmentation': [[round(float(v), 2) for v in poly.reshape(-1)]],
            'area': round(_shoelace(poly), 2),
            'bbox': [round(float(x0), 2), round(float(y0), 2),
                     round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            'iscrowd': 0,
        })
    return img, anns


def generate_coco(root: str | os.PathLike = DEFAULT_ROOT, seed: int = 0, num_train: int = 24,
                  num_val: int = 8, img_size: tuple[int, int] = (96, 128)) -> Path:
    """Write ``<root>/coco`` (instances_{train,val}2017.json + jpgs); returns that folder.

    ``img_size`` is (height, width); non-square on purpose, to catch h/w mix-ups.
    """
    h, w = img_size
    final = Path(root) / 'coco'
    with atomic_dir(final) as tmp:
        for split, num, id_offset in (('train', num_train, 0), ('val', num_val, 100000)):
            folder = f'{split}2017'
            images, annotations = [], []
            for i in range(num):
                image_id = id_offset + i + 1
                img, anns = _coco_image(_rng(seed, 'coco', split, i), h, w, image_id)
                file_name = f'{image_id:012d}.jpg'
                _imwrite(tmp / folder / file_name, img, [cv2.IMWRITE_JPEG_QUALITY, 95])
                images.append({
                    'id': image_id, 'file_name': file_name, 'height': h, 'width': w,
                    'license': 1, 'date_captured': '2024-01-01 00:00:00',
                    'coco_url': '', 'flickr_url': ''})
                annotations.extend(anns)
            ann = {
                'info': {
                    'description': f'flora_mm tiny COCO-format dataset ({folder}, seed {seed})',
                    'url': '', 'version': '1.0', 'year': 2024,
                    'contributor': 'flora_mm.datasets.tiny',
                    'date_created': '2024-01-01 00:00:00'},
                'licenses': [{'id': 1, 'name': 'CC0 1.0', 'url':
                              'https://creativecommons.org/publicdomain/zero/1.0/'}],
                'images': images,
                'annotations': annotations,
                'categories': [dict(c) for c in COCO_CATEGORIES],
            }
            _write_text(tmp / 'annotations' / f'instances_{folder}.json',
                        json.dumps(ann, separators=(',', ':')))
    return final


# --------------------------------------------------------------------------- ADE20K
def _ade_image(rng: np.random.Generator, h: int, w: int):
    label = np.zeros((h, w), np.uint8)
    horizon = int(rng.integers(int(h * 0.35), int(h * 0.6)))
    label[:horizon] = 3  # sky
    label[horizon:] = 4  # floor
    for _ in range(int(rng.integers(1, 3))):  # buildings standing on the horizon
        bw = int(rng.integers(w // 8, w // 3))
        bh = int(rng.integers(h // 5, horizon))
        x = int(rng.integers(0, w - bw))
        label[horizon - bh:horizon + 2, x:x + bw] = 2
    if rng.random() < 0.8:  # a wall panel on the floor
        bw = int(rng.integers(w // 6, w // 3))
        bh = int(rng.integers(max(3, (h - horizon) // 3), h - horizon))
        x = int(rng.integers(0, w - bw))
        y = int(rng.integers(horizon, h - bh + 1))
        label[y:y + bh, x:x + bw] = 1
    for _ in range(int(rng.integers(1, 3))):  # "other" blobs, label 0 (ignored)
        r = int(rng.integers(3, 7))
        c = (int(rng.integers(r, w - r)), int(rng.integers(r, h - r)))
        cv2.circle(label, c, r, 0, thickness=-1)

    img = np.zeros((h, w, 3), np.uint8)
    for lab, (_, rgb) in _ADE_SPECS.items():
        img[label == lab] = _jitter(rng, rgb)
    img[label == 0] = _jitter(rng, _ADE_OTHER_RGB)
    noise = rng.integers(-14, 15, img.shape, dtype=np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return img, label


def generate_ade20k(root: str | os.PathLike = DEFAULT_ROOT, seed: int = 0, num_train: int = 24,
                    num_val: int = 8, img_size: tuple[int, int] = (96, 128)) -> Path:
    """Write ``<root>/ade/ADEChallengeData2016`` (jpg images, png label maps); returns it."""
    h, w = img_size
    final = Path(root) / 'ade' / 'ADEChallengeData2016'
    with atomic_dir(final) as tmp:
        for split, num, folder, prefix in (('train', num_train, 'training', 'ADE_train'),
                                           ('val', num_val, 'validation', 'ADE_val')):
            for i in range(num):
                img, label = _ade_image(_rng(seed, 'ade20k', split, i), h, w)
                stem = f'{prefix}_{i + 1:08d}'
                _imwrite(tmp / 'images' / folder / f'{stem}.jpg', img,
                         [cv2.IMWRITE_JPEG_QUALITY, 95])
                _imwrite(tmp / 'annotations' / folder / f'{stem}.png', label)
    return final


# --------------------------------------------------------------------------- DOTA
def _rotated_corners(cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """4 corners (clockwise in image coordinates) of a w x h box rotated by ``angle`` rad."""
    c, s = np.cos(angle), np.sin(angle)
    local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.array([cx, cy])


def _dota_image(rng: np.random.Generator, size: int):
    img = _noise_background(rng, size, size, rng.integers(40, 80, 3), amplitude=20)
    objects: list[tuple[float, float, float]] = []  # centre x, y, circumradius
    lines = []
    n = int(rng.integers(2, 6))
    for _ in range(100):
        if len(lines) == n:
            break
        cls = DOTA_CLASSES[int(rng.integers(len(DOTA_CLASSES)))]
        rgb, wr, hr = _DOTA_SPECS[cls]
        bw = float(rng.integers(wr[0], wr[1] + 1))
        bh = float(rng.integers(hr[0], hr[1] + 1))
        radius = float(np.hypot(bw, bh) / 2)
        lo, hi = radius + 1, size - radius - 1
        cx, cy = (float(v) for v in rng.uniform(lo, hi, 2))
        if any(np.hypot(cx - ox, cy - oy) < radius + orad + 2 for ox, oy, orad in objects):
            continue
        angle = float(rng.uniform(0, np.pi))
        poly = np.round(_rotated_corners(cx, cy, bw, bh, angle), 1)
        _fill_polygon(img, poly, _jitter(rng, rgb))
        objects.append((cx, cy, radius))
        coords = ' '.join(f'{v:.1f}' for v in poly.reshape(-1))
        lines.append(f'{coords} {cls} 0\n')
    return img, lines


def generate_dota(root: str | os.PathLike = DEFAULT_ROOT, seed: int = 0, num_train: int = 24,
                  num_val: int = 8, img_size: int = 128) -> Path:
    """Write ``<root>/split_ss_dota/{trainval,test}/{images,annfiles}``; returns that folder.

    Image ids follow the split_ss naming ``P0001__<size>__0___0`` so DOTAMetric's
    ``merge_patches`` can parse them; ``test`` has annfiles too so it can be evaluated.
    """
    final = Path(root) / 'split_ss_dota'
    with atomic_dir(final) as tmp:
        for split, num, folder, first in (('train', num_train, 'trainval', 1),
                                          ('val', num_val, 'test', 5001)):
            for i in range(num):
                img, lines = _dota_image(_rng(seed, 'dota', split, i), img_size)
                img_id = f'P{first + i:04d}__{img_size}__0___0'
                _imwrite(tmp / folder / 'images' / f'{img_id}.png', img)
                _write_text(tmp / folder / 'annfiles' / f'{img_id}.txt', ''.join(lines))
    return final


_GENERATORS = {'coco': generate_coco, 'ade20k': generate_ade20k, 'dota': generate_dota}


def generate(root: str | os.PathLike = DEFAULT_ROOT, tasks: Sequence[str] = TASKS,
             seed: int = 0, num_train: int = 24, num_val: int = 8) -> dict[str, Path]:
    """Generate the datasets of ``tasks`` under ``root``; returns {task: dataset folder}."""
    unknown = set(tasks) - set(_GENERATORS)
    if unknown:
        raise ValueError(f'unknown tasks {sorted(unknown)}; choose from {TASKS}')
    return {
        t: _GENERATORS[t](root, seed=seed, num_train=num_train, num_val=num_val)
        for t in tasks
    }
