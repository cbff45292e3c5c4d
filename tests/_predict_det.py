"""Predictions of mmdet detectors on their configs' test images (test helper, also a script).

    python tests/_predict_det.py OUT.pt CONFIG CHECKPOINT [CONFIG CHECKPOINT ...] [--vanilla]

Imports nothing of flora_mm itself: only a config's ``custom_imports`` can bring it in. With
``--vanilla`` each checkpoint is also loaded through mmdet's own ``init_detector`` and its
config's optimizer is built (fine-tuning it further), and the run fails if flora_mm got
imported: that is how tests/test_tools_merge_count.py shows that a merged checkpoint needs only
mmdet + mmpretrain.
"""
import argparse
import sys

import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.runner import Runner, load_checkpoint


def predict(config: str, checkpoint: str) -> dict:
    """{image path: dict(bboxes, scores, labels, masks)}, every box kept (score_thr 0): a model
    trained for a few iterations scores below mmdet's default threshold of 0.05."""
    cfg = Config.fromfile(config)  # runs the config's custom_imports
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    model = MODELS.build(cfg.model)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    model.eval()
    preds = {}
    with torch.no_grad():
        for batch in Runner.build_dataloader(cfg.test_dataloader):
            for sample in model.test_step(batch):
                p = sample.pred_instances
                preds[sample.img_path] = dict(bboxes=p.bboxes, scores=p.scores,
                                              labels=p.labels, masks=p.masks)
    return preds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('out')
    parser.add_argument('pairs', nargs='+', help='CONFIG CHECKPOINT [CONFIG CHECKPOINT ...]')
    parser.add_argument('--vanilla', action='store_true')
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error('give CONFIG CHECKPOINT pairs')
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    results = {ckpt: predict(config, ckpt) for config, ckpt in pairs}
    if args.vanilla:
        from mmdet.apis import init_detector
        from mmengine.optim import build_optim_wrapper
        for config, ckpt in pairs:
            detector = init_detector(config, ckpt, device='cpu')
            assert 'person' in detector.dataset_meta['classes'], detector.dataset_meta
            optim = build_optim_wrapper(detector, Config.fromfile(config).optim_wrapper)
            # the recipe's layer-wise decay, by mmdet's own constructor: several lr groups
            assert len({g['lr'] for g in optim.optimizer.param_groups}) > 2
        loaded = [m for m in sys.modules if m == 'flora_mm' or m.startswith('flora_mm.')]
        assert not loaded, f'flora_mm was imported: {loaded[:5]}'
    torch.save(results, args.out)


if __name__ == '__main__':
    main()
