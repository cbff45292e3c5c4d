"""tools/train.py, tools/test.py and tools/dist_*.sh behave like the OpenMMLab packages' tools.

Unit tests cover the option semantics in flora_mm.apis (local rank, resume, amp,
auto-scale-lr, work_dir, visualization, --out, nccl -> gloo without CUDA). End-to-end tests run
the real tools as subprocesses on the generated tiny data with the packages' OWN configs (from
inside the wheels) shrunk to a ResNet-18 with 8 base channels: train, test with --out and
--show-dir, resume, and a 2-process CPU (gloo) run through dist_train.sh.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flora_mm  # noqa: F401

torch = pytest.importorskip('torch')
from mmengine.config import Config  # noqa: E402

from flora_mm.apis import config as api_config  # noqa: E402
from flora_mm.apis import runner as api_runner  # noqa: E402
from flora_mm.datasets import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'


# --------------------------------------------------------------------------- unit
@pytest.mark.parametrize('flag', ['--local-rank', '--local_rank'])
def test_local_rank_both_spellings_and_env(monkeypatch, flag):
    parser = argparse.ArgumentParser()
    api_config.add_runner_args(parser)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    args = api_config.parse_with_local_rank(parser, [flag, '3'])
    assert args.local_rank == 3 and os.environ['LOCAL_RANK'] == '3'
    monkeypatch.setenv('LOCAL_RANK', '1')  # torchrun sets the env: it wins
    api_config.parse_with_local_rank(parser, [flag, '0'])
    assert os.environ['LOCAL_RANK'] == '1'
    args = api_config.parse_with_local_rank(
        parser, ['--launcher', 'pytorch', '--cfg-options', 'a.b=1', 'c=[1,2]'])
    assert args.launcher == 'pytorch' and args.cfg_options == {'a.b': 1, 'c': [1, 2]}
    with pytest.raises(SystemExit):
        api_config.parse_with_local_rank(parser, ['--launcher', 'bogus'])


def test_tool_arguments_are_the_packages(tmp_path):
    """The tools' own parsers: every OpenMMLab option is there, bad ones are refused."""
    for tool, options in (('train.py', ['--work-dir', '--resume', '--amp', '--auto-scale-lr',
                                        '--cfg-options', '--launcher', '--local-rank']),
                          ('test.py', ['--work-dir', '--out', '--show', '--show-dir',
                                       '--wait-time', '--tta', '--cfg-options', '--launcher'])):
        proc = subprocess.run([sys.executable, str(TOOLS / tool), '--help'], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(option in proc.stdout for option in options), proc.stdout
    proc = subprocess.run([sys.executable, str(TOOLS / 'train.py'), 'c.py', '--launcher',
                           'bogus'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'bogus'" in proc.stderr


def test_resume_semantics():
    cfg = Config(dict(load_from='pretrained.pth', resume=False))
    api_runner.apply_resume(cfg, None)
    assert cfg.resume is False and cfg.load_from == 'pretrained.pth'
    api_runner.apply_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from is None
    api_runner.apply_resume(cfg, 'ckpt.pth')
    assert cfg.resume is True and cfg.load_from == 'ckpt.pth'


def test_amp_and_auto_scale_lr():
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='SGD')),
                      auto_scale_lr=dict(enable=False, base_batch_size=16)))
    api_runner.enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    api_runner.enable_amp(cfg)  # already on: warns only
    api_runner.enable_auto_scale_lr(cfg)
    assert cfg.auto_scale_lr.enable is True
    with pytest.raises(AssertionError):
        api_runner.enable_amp(Config(dict(optim_wrapper=dict(type='ApexOptimWrapper'))))
    with pytest.raises(RuntimeError):
        api_runner.enable_auto_scale_lr(Config(dict()))


def test_work_dir_priority(tmp_path):
    path = tmp_path / 'my_exp.py'
    path.write_text("default_scope = 'mmdet'\n")
    load = api_config.load_runner_config
    assert load(str(path)).work_dir == os.path.join('./work_dirs', 'my_exp')
    assert load(str(path)).launcher == 'none'
    path.write_text("default_scope = 'mmdet'\nwork_dir = 'from_cfg'\n")
    assert load(str(path)).work_dir == 'from_cfg'
    assert load(str(path), work_dir='from_cli').work_dir == 'from_cli'
    with pytest.raises(ValueError):
        api_config.get_scope(Config(dict(default_scope='mmpretrain')))
    with pytest.raises(FileNotFoundError, match='config file not found'):
        api_config.load_config(str(tmp_path / 'missing.py'))


def _dist_cfg(**kw):
    return Config(dict(
        default_scope='mmseg', env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)),
        model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                   heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True))]), **kw))


def test_cpu_distributed_uses_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = _dist_cfg(launcher='pytorch', find_unused_parameters=True)
    assert api_config.adapt_to_cpu_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo' and cfg.env_cfg.dist_cfg.timeout == 60
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.model.heads[0].norm_cfg.type == 'BN'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is True

    cfg = _dist_cfg(launcher='none')  # not distributed: nothing to do
    assert not api_config.adapt_to_cpu_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = _dist_cfg(launcher='pytorch')
    assert not api_config.adapt_to_cpu_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'


def test_visualization_and_out_follow_the_scope():
    args = dict(show=False, show_dir='vis', wait_time=2)
    det = Config(dict(default_scope='mmrotate', visualizer=dict(type='V'),
                      default_hooks=dict(visualization=dict(type='DetVisualizationHook'))))
    api_runner.trigger_visualization_hook(det, **args)
    assert det.default_hooks.visualization.draw is True
    assert det.default_hooks.visualization.test_out_dir == 'vis'
    seg = Config(dict(default_scope='mmseg', visualizer=dict(type='V'),
                      default_hooks=dict(visualization=dict(type='SegVisualizationHook')),
                      test_evaluator=dict(type='IoUMetric')))
    api_runner.trigger_visualization_hook(seg, **args)
    assert seg.visualizer.save_dir == 'vis' and seg.default_hooks.visualization.draw
    api_runner.set_out(seg, 'preds')
    assert seg.test_evaluator.output_dir == 'preds' and seg.test_evaluator.keep_results
    with pytest.raises(RuntimeError):
        api_runner.trigger_visualization_hook(Config(dict(default_hooks=dict())), **args)


# --------------------------------------------------------------------------- end to end
def _wheel_config(package: str, rel: str) -> str:
    mod = __import__(package)
    return str(Path(mod.__file__).parent / '.mim' / 'configs' / rel)


_SMALL_RESNET = "dict(depth=18, base_channels=8, init_cfg=None)"
_NECK = "neck=dict(in_channels=[8, 16, 32, 64], out_channels=16)"
_LOADERS = """
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline, **ds))
test_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                       dataset=dict(pipeline=test_pipeline, test_mode=True, **val_ds))
# no validation while training (mmengine validates after the last epoch otherwise): the
# evaluation is the test tool's job here
val_dataloader = val_cfg = val_evaluator = None
"""

CONFIGS = {
    'mmdet': f"""
_base_ = {_wheel_config('mmdet', 'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')!r}
data_root = '{{root}}/coco/'
model = dict(
    backbone={_SMALL_RESNET}, {_NECK}, rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16),
                  bbox_head=dict(in_channels=16, fc_out_channels=32, num_classes=3),
                  mask_roi_extractor=dict(out_channels=16),
                  mask_head=dict(in_channels=16, conv_out_channels=16, num_classes=3)))
train_pipeline = [dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='Resize', scale=(128, 96), keep_ratio=True),
                  dict(type='RandomFlip', prob=0.5),
                  dict(type='PackDetInputs')]
test_pipeline = [dict(type='LoadImageFromFile'),
                 dict(type='Resize', scale=(128, 96), keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                                       'img_shape', 'scale_factor'))]
ds = dict(data_root=data_root, metainfo=dict(classes={tiny.COCO_CLASSES!r}))
val_ds = ds
{_LOADERS}
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
train_cfg = dict(max_epochs=1)
""",
    'mmseg': f"""
_base_ = {_wheel_config('mmseg', 'upernet/upernet_r50_4xb4-80k_ade20k-512x512.py')!r}
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None, data_preprocessor=dict(size=(64, 64)),
    backbone=dict(depth=18, stem_channels=8, base_channels=8, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=[8, 16, 32, 64], channels=16, num_classes=4,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=32, channels=8, num_classes=4, norm_cfg=norm_cfg))
train_pipeline = [dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', reduce_zero_label=True),
                  dict(type='RandomCrop', crop_size=(64, 64)),
                  dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'),
                 dict(type='LoadAnnotations', reduce_zero_label=True),
                 dict(type='PackSegInputs')]
ds = dict(data_root='{{root}}/ade/ADEChallengeData2016',
          metainfo=dict(classes={tiny.ADE_CLASSES!r}))
val_ds = ds
{_LOADERS}
train_cfg = dict(max_iters=2)
default_hooks = dict(checkpoint=dict(interval=2))
""",
    'mmrotate': f"""
_base_ = {_wheel_config('mmrotate', 'oriented_rcnn/oriented-rcnn-le90_r50_fpn_1x_dota.py')!r}
model = dict(
    backbone={_SMALL_RESNET}, {_NECK}, rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16),
                  bbox_head=dict(in_channels=16, fc_out_channels=32, num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100)),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100),
                  rcnn=dict(nms_pre=200, max_per_img=20)))
train_pipeline = [dict(type='mmdet.LoadImageFromFile'),
                  dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
                  dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
                  dict(type='mmdet.Resize', scale=(128, 128), keep_ratio=True),
                  dict(type='mmdet.RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
                  dict(type='mmdet.PackDetInputs')]
test_pipeline = [dict(type='mmdet.LoadImageFromFile'),
                 dict(type='mmdet.Resize', scale=(128, 128), keep_ratio=True),
                 dict(type='mmdet.LoadAnnotations', with_bbox=True, box_type='qbox'),
                 dict(type='ConvertBoxType', box_type_mapping=dict(gt_bboxes='rbox')),
                 dict(type='mmdet.PackDetInputs', meta_keys=('img_id', 'img_path',
                      'ori_shape', 'img_shape', 'scale_factor'))]
ds = dict(data_root='{{root}}/split_ss_dota/', img_shape=(128, 128),
          metainfo=dict(classes={tiny.DOTA_CLASSES!r}))
val_ds = dict(ds, ann_file='test/annfiles/', data_prefix=dict(img_path='test/images/'))
{_LOADERS}
train_cfg = dict(max_epochs=1)
""",
}


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('tools_data')
    tiny.generate(root, num_train=4, num_val=2)
    return root


def _config(tmp_path: Path, tiny_root: Path, scope: str) -> str:
    path = tmp_path / f'tiny_{scope}.py'
    path.write_text(CONFIGS[scope].replace('{root}', str(tiny_root)))
    return str(path)


def _run(args, cwd, env=None, timeout=300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmrotate'])
def test_train_then_test_end_to_end(tmp_path, tiny_root, scope):
    config = _config(tmp_path, tiny_root, scope)
    _run([str(TOOLS / 'train.py'), config], cwd=tmp_path)  # default work dir
    work_dir = tmp_path / 'work_dirs' / f'tiny_{scope}'
    ckpt = (work_dir / 'last_checkpoint').read_text().strip()
    assert Path(ckpt).is_file()

    out = 'preds' if scope == 'mmseg' else 'preds.pkl'
    # mmseg's SegVisualizationHook draws every 50th batch by default (as in mmseg's own tool)
    extra = ['--cfg-options', 'default_hooks.visualization.interval=1'] if scope == 'mmseg' else []
    log = _run([str(TOOLS / 'test.py'), config, ckpt, '--work-dir', 'test_dir', '--out', out,
                '--show-dir', 'vis', *extra], cwd=tmp_path)
    assert ('mIoU' if scope == 'mmseg' else 'mAP') in log
    if scope == 'mmseg':  # IoUMetric writes one png per image, visualizer under save_dir
        assert len(list((tmp_path / 'preds').glob('*.png'))) == 2
        assert list((tmp_path / 'vis').rglob('*.png'))
    else:  # DumpResults pickle, painted images in work_dir/<timestamp>/vis
        import pickle
        with open(tmp_path / 'preds.pkl', 'rb') as f:
            preds = pickle.load(f)
        assert len(preds) == 2 and all('pred_instances' in p for p in preds)
        assert len(list((tmp_path / 'test_dir').glob('*/vis/*'))) == 2

    if scope == 'mmseg':  # auto-resume from the latest checkpoint of the work dir
        log = _run([str(TOOLS / 'train.py'), config, '--resume', '--cfg-options',
                    'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=2'],
                   cwd=tmp_path)
        assert 'resumed' in log.lower() and 'iter_2.pth' in log
        assert (work_dir / 'iter_4.pth').is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU (gloo) fallback')
def test_dist_train_on_cpu_uses_gloo(tmp_path, tiny_root):
    config = _config(tmp_path, tiny_root, 'mmseg')
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(['bash', str(TOOLS / 'dist_train.sh'), config, '2', '--work-dir',
                           'dist'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "backend': 'gloo'" in log and 'Distributed training: True' in log
    assert (tmp_path / 'dist' / 'iter_2.pth').is_file()
