"""tools/count_params.py and tools/merge_adapters.py (flora_mm.apis.count and .merge).

count_params: every leaf config's backbone counts equal closed forms computed here from the
architectures alone (ConvNeXt-V2-L, InternViT-6B) and the method formulas (FLoRA paper §4.1,
LoRA eq. 3), on the meta device with no checkpoint file.

merge_adapters: a tiny COCO Mask R-CNN is fine-tuned for 2 iterations with the real
tools/train.py, merged from the full .pth and from the adapter-only safetensors, and the merged
checkpoints are loaded by plain mmdet + mmpretrain in a process that never imports flora_mm;
their predictions must equal the adapted model's.
"""
from __future__ import annotations

import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from flora_mm.apis import MergeError, build_model, count_params, load_config, merge
from flora_mm.apis.merge import build_exported
from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate
from flora_mm.models import ConvNeXtV2, describe
from flora_mm.models.convnextv2 import (mmpretrain_convnext_cfg, timm_to_mmpretrain,
                                        timm_to_mmpretrain_key)

from ._methods import spec
from ._predict_det import predict

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# the families with closed forms below (the configs for the backbones users bring are checked
# in tests/test_backbone_configs.py)
LEAF_CONFIGS = sorted(p for task in ('coco', 'ade20k', 'dota')
                      for family in ('convnextv2', 'internvit6b')
                      for p in glob.glob(osp.join(ROOT, 'configs', task, f'{family}_*.py')))
TINY_COCO = osp.join(ROOT, 'configs/coco/tiny/convnextv2_flora_r16.py')

# ----------------------------------------------------------------------------- closed forms
# A layer is (d_out, d_in / groups, kernel size or None for Linear, has bias).
CONVNEXTV2 = {'large': ((3, 3, 27, 3), (192, 384, 768, 1536))}
INTERNVIT_6B = dict(dim=3200, depth=48, mlp=4, patch=14)


def convnext_parts(arch: str) -> tuple[list, int, int]:
    """(target layers, all parameters, parameters of the output norms ``norm0..3``)."""
    depths, dims = CONVNEXTV2[arch]
    layers = [(dims[0], 3, 4, True)]                       # stem conv 4x4 s4
    other = 2 * dims[0]                                    # stem LayerNorm
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i:
            layers.append((c, dims[i - 1], 2, True))       # downsample conv 2x2 s2
            other += 2 * dims[i - 1]                       # its LayerNorm
        for _ in range(depth):
            layers += [(c, 1, 7, True),                    # depthwise 7x7 (groups = c)
                       (4 * c, c, None, True), (c, 4 * c, None, True)]  # MLP fc1, fc2
            other += 2 * c + 2 * 4 * c                     # block LayerNorm, GRN gamma/beta
    norms = sum(2 * c for c in dims)
    total = sum(_weights(layer) for layer in layers) + other + norms
    return layers, total, norms


def internvit_parts(img_size: int) -> tuple[list, int, int]:
    """InternViT-6B at ``img_size`` with InternVL's simple FPN (``up1..up4``)."""
    d, depth, patch = INTERNVIT_6B['dim'], INTERNVIT_6B['depth'], INTERNVIT_6B['patch']
    hidden = INTERNVIT_6B['mlp'] * d
    layers = [(d, 3, patch, True)]                         # patch embedding
    other = d + (1 + (img_size // patch) ** 2) * d         # cls token, position embedding
    for _ in range(depth):
        layers += [(3 * d, d, None, False), (d, d, None, True),         # qkv (no bias), proj
                   (hidden, d, None, True), (d, hidden, None, True)]    # fc1, fc2
        other += 6 * d              # RMSNorm norm1/norm2, q_norm, k_norm (weights), ls1, ls2
    deconv = d * d * 2 * 2 + d
    fpn = 3 * deconv + 2 * d        # up1: deconv, LayerNorm2d, deconv; up2: deconv
    total = sum(_weights(layer) for layer in layers) + other + fpn
    return layers, total, fpn


def _weights(layer) -> int:
    d_out, d_in, k, bias = layer
    return d_out * d_in * (k * k if k else 1) + (d_out if bias else 0)


def method_params(layer, peft: dict) -> int:
    """Tensors a method adds to one targeted layer (BitFit: the bias it trains)."""
    d_out, d_in, k, bias = layer
    kind = peft['type']
    if kind == 'FLoRA':
        r1, r2 = min(peft['rank'], d_out), min(peft['rank'], d_in)
        if k is None:
            return r1 * r2 + r1 * d_out + r2 * d_in
        r3 = min(peft['kernel_rank'], k)
        return r1 * r2 * r3 ** 2 + r1 * d_out + r2 * d_in + 2 * r3 * k
    if kind in ('LoRA', 'DoRA'):
        lora = peft['rank'] * (d_out + d_in * (k * k if k else 1))
        return lora + (d_out if kind == 'DoRA' else 0)
    if kind == 'BitFit':
        return d_out if bias else 0
    if kind in ('LoCon', 'LoHa', 'LoKr'):
        # their counts from the libraries' formulas (tests/_methods.py), in the settings the
        # recipes use (configs/*/convnextv2_{locon,loha,lokr}_r16.py)
        assert peft.get('tucker', True) and not peft.get('use_effective_conv2d', False)
        assert not peft.get('decompose_both', False)
        return spec(kind).layer_count(d_out, d_in, k, peft['rank'],
                                      peft.get('decompose_factor', -1))
    raise AssertionError(kind)


def expected_backbone(cfg: Config) -> tuple[int, int]:
    """(total, trainable) of the adapted backbone, from the architecture and the method."""
    inner, peft = cfg.model.backbone.backbone, cfg.model.backbone.peft
    if inner.type == 'ConvNeXtV2':
        layers, plain, saved = convnext_parts(inner.arch)
    else:
        assert inner.type == 'InternViT' and inner.arch == '6b'
        layers, plain, saved = internvit_parts(inner.img_size)
    kind = {'Base': 'Frozen'}.get(peft.type, peft.type)
    if kind == 'Full':
        return plain, plain
    if kind == 'Frozen':
        return plain, saved  # the modules_to_save (output norms / simple FPN) train anyway
    assert set(peft.targets.types) == {'Conv2d', 'Linear'} and not peft.get('overrides')
    per_layer = sum(method_params(layer, peft) for layer in layers)
    added = 0 if kind == 'BitFit' else per_layer
    return plain + added, per_layer + saved


def test_closed_forms_match_the_architectures():
    """The hand-written architectures are the real ones (sizes quoted in REFERENCE.md)."""
    layers, total, norms = convnext_parts('large')
    assert round((total - norms) / 1e6, 1) == 196.4
    assert sum(1 for layer in layers if layer[2]) == 40 and len(layers) - 40 == 72
    _, total6b, _ = internvit_parts(224)
    assert 5.9e9 < total6b < 6.1e9


@pytest.mark.parametrize('config', LEAF_CONFIGS, ids=lambda p: osp.relpath(p, ROOT))
def test_count_params_every_config_on_meta(config):
    cfg = Config.fromfile(config)
    counts = count_params(cfg)
    parts = {p['part']: p for p in counts['parts']}
    total, trainable = expected_backbone(cfg)
    method = {'Base': 'Frozen'}.get(cfg.model.backbone.peft.type, cfg.model.backbone.peft.type)
    assert parts['backbone']['method'] == method
    assert (parts['backbone']['total'], parts['backbone']['trainable']) == (total, trainable)
    for name, part in parts.items():  # neck and heads train from scratch
        if name != 'backbone':
            assert part['trainable'] == part['total'] > 0, name
    assert counts['total'] == sum(p['total'] for p in parts.values())
    assert counts['trainable'] == sum(p['trainable'] for p in parts.values())


def test_count_params_cli_json(tmp_path):
    """The CLI's --json output is pure JSON (logs go to stderr), from a config whose
    pretrained file does not exist here: nothing is read."""
    config = osp.join(ROOT, 'configs/ade20k/internvit6b_flora_r16.py')
    assert not osp.exists(Config.fromfile(config).model.backbone.backbone.init_cfg.checkpoint)
    proc = _run([sys.executable, osp.join(ROOT, 'tools/count_params.py'), config, '--json',
                 '--cfg-options', 'model.backbone.peft.rank=8'], cwd=str(tmp_path))
    out = json.loads(proc.stdout)
    cfg = Config.fromfile(config)
    cfg.merge_from_dict({'model.backbone.peft.rank': 8})
    assert out['parts'][0]['trainable'] == expected_backbone(cfg)[1]
    assert out['per_method']['FLoRA']['layers'] == 1 + 4 * 48


# ----------------------------------------------------------------------------- key conversion
@pytest.mark.parametrize('arch', ['atto', 'tiny'])  # 1x1-conv MLP (conv_mlp) and Linear MLP
def test_timm_to_mmpretrain_convnext_same_features(arch):
    from mmpretrain.models import ConvNeXt
    torch.manual_seed(0)
    ours = ConvNeXtV2(arch, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():  # timm inits GRN to zero: make it matter
        for name, p in ours.named_parameters():
            if 'grn' in name or name.startswith('norm'):
                p.normal_(0.5, 0.2)
    export = describe(ours).export(ours.state_dict(), {})
    spec = export.cfg
    assert spec['type'] == 'mmpretrain.ConvNeXt' and spec['gap_before_final_norm'] is False
    assert spec == mmpretrain_convnext_cfg(ours) and export.imports == ['mmpretrain.models']
    assert export.state.keys() == timm_to_mmpretrain(ours.state_dict()).keys()
    theirs = build_exported(export)
    theirs.eval()  # (mmpretrain's ConvNeXt.train returns None: no chaining)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert timm_to_mmpretrain_key('stages.2.blocks.5.mlp.grn.weight') == 'stages.2.5.grn.gamma'
    with pytest.raises(ValueError, match='no mmpretrain'):
        timm_to_mmpretrain_key('head.fc.weight')
    with pytest.raises(ValueError, match='out_norm=False'):
        mmpretrain_convnext_cfg(ConvNeXtV2('atto', out_norm=False))


# ----------------------------------------------------------------------------- merge end to end
def _run(cmd: list[str], cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f'{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Tiny COCO (8 train / 4 val images) and 2 training iterations of FLoRA r16 on
    ConvNeXt-V2-atto with tools/train.py, run from the data's folder (relative paths)."""
    root = tmp_path_factory.mktemp('merge')
    generate(str(root / 'data/tiny'), tasks=['coco'], num_train=8, num_val=4)
    generate_checkpoints(str(root / 'data/tiny'))
    work = root / 'work'
    _run([sys.executable, osp.join(ROOT, 'tools/train.py'), TINY_COCO, '--work-dir', str(work),
          '--cfg-options', 'train_cfg.max_epochs=1', 'default_hooks.checkpoint.interval=1',
          'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'], cwd=str(root))
    full, adapter = work / 'epoch_1.pth', work / 'epoch_1_adapter.safetensors'
    assert full.is_file() and adapter.is_file(), os.listdir(work)
    pretrained = str(root / 'data/tiny/checkpoints/convnextv2_atto.pth')
    return dict(root=root, full=str(full), adapter=str(adapter), pretrained=pretrained)


def test_merge_full_and_adapter_checkpoints_load_in_vanilla_mmdet(trained, monkeypatch):
    root = trained['root']
    out_full, out_adapter = str(root / 'out/full.pth'), str(root / 'out/adapter.pth')
    # full checkpoint through the CLI; adapter-only in-process with the base weights' path
    proc = _run([sys.executable, osp.join(ROOT, 'tools/merge_adapters.py'), TINY_COCO,
                 trained['full'], out_full], cwd=str(root))
    assert 'backbone: mmpretrain.ConvNeXt; verified' in proc.stdout
    summary = merge(
        TINY_COCO, trained['adapter'], out_adapter,
        cfg_options={'model.backbone.backbone.init_cfg.checkpoint': trained['pretrained']})
    assert summary['merged_layers'] == 40 and summary['verify_error'] < 1e-4

    for out in (out_full, out_adapter):
        ckpt = torch.load(out, map_location='cpu', weights_only=True)  # plain values only
        keys = list(ckpt['state_dict'])
        assert not any(('flora_' in k or 'lora_' in k) for k in keys)
        assert 'backbone.stages.3.1.grn.gamma' in keys and 'backbone.norm3.weight' in keys
        assert ckpt['state_dict']['backbone.stages.0.0.pointwise_conv1.weight'].dim() == 2
        text = open(out[:-len('.pth')] + '.py').read()
        assert 'flora_mm' not in text and 'FLoRAHook' not in text and 'PEFTBackbone' not in text
        assert "'mmpretrain.ConvNeXt'" in text and "'mmpretrain.models'" in text
        assert "constructor='LearningRateDecayOptimizerConstructor'" in text
    sd_full = torch.load(out_full, weights_only=True)['state_dict']
    sd_adapter = torch.load(out_adapter, weights_only=True)['state_dict']
    assert sd_full.keys() == sd_adapter.keys()
    for k in sd_full:
        torch.testing.assert_close(sd_full[k], sd_adapter[k], rtol=0, atol=0, msg=k)

    monkeypatch.chdir(root)  # the tiny config's data paths are relative
    adapted = predict(TINY_COCO, trained['full'])
    _run([sys.executable, osp.join(ROOT, 'tests/_predict_det.py'), str(root / 'vanilla.pt'),
          str(root / 'out/full.py'), out_full, str(root / 'out/adapter.py'), out_adapter,
          '--vanilla'], cwd=str(root))
    vanilla = torch.load(root / 'vanilla.pt', weights_only=True)
    boxes = 0
    for out in (out_full, out_adapter):
        assert vanilla[out].keys() == adapted.keys() and len(adapted) == 4
        for img, ref in adapted.items():
            got = vanilla[out][img]
            assert torch.equal(got['labels'], ref['labels']), img
            torch.testing.assert_close(got['bboxes'], ref['bboxes'], rtol=0, atol=1e-3)
            torch.testing.assert_close(got['scores'], ref['scores'], rtol=1e-4, atol=1e-6)
            assert (got['masks'] != ref['masks']).float().mean() < 1e-3
            boxes += len(ref['scores'])
    assert boxes > 0


def test_merge_errors(trained, tmp_path):
    out = str(tmp_path / 'merged.pth')
    with pytest.raises(MergeError, match='checkpoint not found'):
        merge(TINY_COCO, str(tmp_path / 'missing.pth'), out)
    with pytest.raises(MergeError, match='config file not found'):
        merge(str(tmp_path / 'missing.py'), trained['full'], out)
    with pytest.raises(MergeError, match='--adapter'):
        merge(TINY_COCO, trained['full'], out, adapter=True)
    # another rank than the one trained: does not fit (full) / other method config (adapter)
    other_rank = {'model.backbone.peft.rank': 8,
                  'model.backbone.backbone.init_cfg.checkpoint': trained['pretrained']}
    with pytest.raises(MergeError, match='does not fit.*with another shape'):
        merge(TINY_COCO, trained['full'], out, cfg_options=other_rank)
    with pytest.raises(MergeError, match='does not fit.*PEFT methods'):
        merge(TINY_COCO, trained['adapter'], out, cfg_options=other_rank)
    # adapters trained on other base weights
    other = generate_checkpoints(str(tmp_path / 'other'), seed=1)['convnextv2_atto']
    with pytest.raises(MergeError, match='fingerprint'):
        merge(TINY_COCO, trained['adapter'], out, cfg_options={
            'model.backbone.backbone.init_cfg.checkpoint': str(other)})
    assert sorted(os.listdir(tmp_path)) == ['other']  # nothing half-written
    # an existing OUT needs --force
    open(out, 'w').close()
    with pytest.raises(MergeError, match='exists'):
        merge(TINY_COCO, trained['full'], out, check=False)
    merge(TINY_COCO, trained['full'], out, force=True, check=False,
                         plain_keys=True)
    ckpt = torch.load(out, weights_only=True)
    assert 'backbone.stages.0.blocks.0.mlp.fc1.weight' in ckpt['state_dict']  # timm names
    assert "type='ConvNeXtV2'" in open(str(tmp_path / 'merged.py')).read()


@pytest.mark.parametrize('config', [
    'configs/ade20k/tiny/convnextv2_flora_r16.py',   # mmseg UperNet -> mmpretrain ConvNeXt
    'configs/ade20k/tiny/internvit6b_flora_r16.py',  # InternViT: keeps flora_mm's type
    'configs/dota/tiny/convnextv2_flora_r16.py',     # mmrotate Oriented R-CNN
])
def test_merge_other_tasks_in_process(config, tmp_path):
    """A full checkpoint with random (non-zero) adapters, merged; the written config + file
    give the adapted model's features again (built here through the registries)."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    from flora_mm.peft import adapter_layers

    ckpts = generate_checkpoints(str(tmp_path / 'ckpt'))
    name = 'internvit_tiny' if 'internvit' in config else 'convnextv2_atto'
    options = {'model.backbone.backbone.init_cfg.checkpoint': str(ckpts[name])}
    cfg = load_config(osp.join(ROOT, config), options)
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.flora_core.normal_(0, 0.05)
    full = str(tmp_path / 'full.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, full)
    out = str(tmp_path / 'out' / 'merged.pth')
    summary = merge(osp.join(ROOT, config), full, out, cfg_options=options)
    assert summary['verify_error'] < 1e-4

    merged_cfg = Config.fromfile(out[:-len('.pth')] + '.py')
    text = open(out[:-len('.pth')] + '.py').read()
    assert 'PEFTBackbone' not in text and 'FLoRAHook' not in text
    if 'internvit' in config:
        assert merged_cfg.model.backbone.type == 'InternViT'
        assert merged_cfg.custom_imports.imports == ['flora_mm']
        assert 'init_cfg' not in merged_cfg.model.backbone
    else:
        assert merged_cfg.model.backbone.type == 'mmpretrain.ConvNeXt'
        assert merged_cfg.custom_imports.imports == ['mmpretrain.models']
    init_default_scope(merged_cfg.default_scope)
    merged = MODELS.build(merged_cfg.model)
    load_checkpoint(merged, out, map_location='cpu', strict=True, logger='silent')
    merged.eval()
    x = torch.randn(1, 3, 112, 140, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(model.extract_feat(x), merged.extract_feat(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- issue 8
class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_merge_refuses_bad_out_unsafe_and_non_finite_inputs(trained, tmp_path):
    """Bad OUT paths fail before any work; a checkpoint whose unpickling would run code is
    refused by name (and nothing runs); NaN tensors are refused; nothing is written."""
    from safetensors.torch import load_file, save_file
    # OUT: a directory, no .pth -- refused before the (missing) checkpoint is even looked at
    for bad_out, message in ((str(tmp_path), 'directory'), (str(tmp_path / 'merged'), '.pth')):
        with pytest.raises(MergeError, match=message):
            merge(TINY_COCO, str(tmp_path / 'missing.pth'), bad_out)
    out = str(tmp_path / 'out' / 'merged.pth')
    marker = tmp_path / 'PWNED'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'x': _Payload(marker)}}, evil)
    with pytest.raises(MergeError, match=r'evil\.pth.*(posix|os)\.system'):
        merge(TINY_COCO, str(evil), out)
    assert not marker.exists()
    # NaN in a full checkpoint and in an adapter file
    ckpt = torch.load(trained['full'], weights_only=True)
    key = next(k for k in ckpt['state_dict'] if 'flora_core' in k)
    ckpt['state_dict'][key].view(-1)[0] = float('nan')
    torch.save(ckpt, tmp_path / 'nan.pth')
    with pytest.raises(MergeError, match=r'non-finite.*flora_core'):
        merge(TINY_COCO, str(tmp_path / 'nan.pth'), out)
    tensors = load_file(trained['adapter'])
    tensors[key].view(-1)[0] = float('inf')
    save_file(tensors, str(tmp_path / 'nan_adapter.safetensors'))
    with open(trained['adapter'][:-len('.safetensors')] + '.json') as src, \
            open(tmp_path / 'nan_adapter.json', 'w') as dst:
        dst.write(src.read())
    with pytest.raises(MergeError, match=r'non-finite.*flora_core'):
        merge(TINY_COCO, str(tmp_path / 'nan_adapter.safetensors'), out, cfg_options={
            'model.backbone.backbone.init_cfg.checkpoint': trained['pretrained']})
    assert not osp.exists(tmp_path / 'out')


def test_test_tool_paths(trained, tmp_path, monkeypatch):
    """tools/test.py (flora_mm.apis.test): a full checkpoint needs no pretrained file; an
    adapter file is checked against its base; an unsafe file is refused."""
    from flora_mm.apis import test
    from flora_mm.checkpoint import CheckpointError, UnsafeCheckpointError
    monkeypatch.chdir(trained['root'])  # the tiny config's data paths are relative
    gone = {'model.backbone.backbone.init_cfg.checkpoint': str(tmp_path / 'gone.pth')}
    # (the tiny model finds no boxes after 2 iterations: metrics are empty; that both runs
    # complete is the point, tests/test_reliability.py compares the loaded weights)
    assert isinstance(test(TINY_COCO, trained['full'], work_dir=str(tmp_path / 'a'),
                           cfg_options=gone), dict)
    with_base = {'model.backbone.backbone.init_cfg.checkpoint': trained['pretrained']}
    assert isinstance(test(TINY_COCO, trained['adapter'], work_dir=str(tmp_path / 'b'),
                           cfg_options=with_base), dict)
    other = generate_checkpoints(str(tmp_path / 'other'), seed=1)['convnextv2_atto']
    with pytest.raises(CheckpointError, match='fingerprint'):
        test(TINY_COCO, trained['adapter'], work_dir=str(tmp_path / 'c'), cfg_options={
            'model.backbone.backbone.init_cfg.checkpoint': str(other)})
    marker = tmp_path / 'PWNED'
    torch.save({'state_dict': {}, 'meta': {'x': _Payload(marker)}}, tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
        test(TINY_COCO, str(tmp_path / 'evil.pth'), work_dir=str(tmp_path / 'd'))
    assert not marker.exists()
