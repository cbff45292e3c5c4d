"""Pretrained loading that fails loudly: unsafe pickles, corrupt files, sharded releases,
incomplete or mis-shaped checkpoints. The tests write every file in its real format."""
import json
import os
import re

import flora_mm  # noqa: F401
import pytest
import timm
import torch
from safetensors.torch import save_file

from flora_mm.models import ConvNeXtV2, InternViT
from flora_mm.models._checkpoint import PretrainedLoadError


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


def _atto_sd():
    torch.manual_seed(1)
    return timm.create_model('convnextv2_atto', pretrained=False, num_classes=0).state_dict()


def _tiny_vit(depth=4, **kw):
    kw.setdefault('img_size', 56)
    arch = 'tiny' if depth == 4 else dict(depth=depth)
    return InternViT(arch, **kw)


def _hf_keys(sd):
    """InternVL keys -> HF InternViT release keys (InternVisionModel)."""
    out = {}
    for k, v in sd.items():
        k = {'cls_token': 'embeddings.class_embedding',
             'pos_embed': 'embeddings.position_embedding'}.get(k, k)
        k = k.replace('patch_embed.proj.', 'embeddings.patch_embedding.')
        if k.startswith('blocks.'):
            k = re.sub(r'\.(ls[12])\.gamma$', r'.\1', 'encoder.layers.' + k[len('blocks.'):])
        out[k] = v.contiguous()
    return out


class _Payload:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_unsafe_pickle_is_refused_naming_file_and_global(tmp_path):
    marker = tmp_path / 'PWNED'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': _atto_sd(), 'payload': _Payload(marker)}, path)
    with pytest.raises(PretrainedLoadError) as err:
        ConvNeXtV2('atto', init_cfg=_pretrained(path)).init_weights()
    msg = str(err.value)
    assert str(path) in msg and ('posix.system' in msg or 'os.system' in msg)
    assert not marker.exists()


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_truncated_file_names_its_path(tmp_path, fmt):
    sd = _atto_sd()
    path = tmp_path / f'cut.{fmt}'
    if fmt == 'pth':
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedLoadError, match=re.escape(str(path))):
        ConvNeXtV2('atto', init_cfg=_pretrained(path)).init_weights()


def _write_sharded(tmp_path, sd, shards=3):
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    index = tmp_path / 'model.safetensors.index.json'
    index.write_text(json.dumps({'metadata': {'total_size': 0}, 'weight_map': weight_map}))
    return index


@pytest.mark.parametrize('given', ['index', 'directory'])
def test_sharded_hf_release_loads_directly(tmp_path, given):
    torch.manual_seed(0)
    src = _tiny_vit(with_fpn=False)
    src_sd = src.state_dict()
    hf = {'vision_model.' + k: v for k, v in _hf_keys(src_sd).items()}
    index = _write_sharded(tmp_path, hf)
    path = index if given == 'index' else tmp_path
    m = _tiny_vit(init_cfg=_pretrained(path))
    m.init_weights()
    own = m.state_dict()
    for k, v in src_sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_sharded_release_with_missing_shard_names_it(tmp_path):
    index = _write_sharded(tmp_path, _hf_keys(_tiny_vit(with_fpn=False).state_dict()))
    (tmp_path / 'model-00002-of-00003.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model-00002-of-00003.safetensors'):
        _tiny_vit(init_cfg=_pretrained(index)).init_weights()


def test_shallower_checkpoint_is_an_error_naming_blocks_and_depth(tmp_path):
    """A 3-block release in a 4-block model reading block 3 (the 45-in-48-layer case)."""
    path = tmp_path / 'shallow.pth'
    torch.save({'module': _tiny_vit(depth=3, with_fpn=False).state_dict()}, path)
    with pytest.raises(PretrainedLoadError) as err:
        _tiny_vit(init_cfg=_pretrained(path)).init_weights()
    msg = str(err.value)
    assert 'blocks.3' in msg and 'blocks.2' not in msg
    assert 'depth=3' in msg and str(path) in msg
    # reading only blocks the file has is fine: block 3 stays random with a warning
    m = _tiny_vit(with_fpn=False, out_indices=(0, 1, 2), init_cfg=_pretrained(path))
    m.init_weights()
    missing, _ = m.load_pretrained(str(path))
    assert missing and all(k.startswith('blocks.3.') for k in missing)


def test_convnext_missing_stage_blocks_suggests_arch(tmp_path):
    sd = {k: v for k, v in _atto_sd().items() if not k.startswith('stages.2.blocks.5.')}
    path = tmp_path / 'five.pth'
    torch.save(sd, path)
    with pytest.raises(PretrainedLoadError, match=r'stages\.2\.blocks\.5') as err:
        ConvNeXtV2('atto', init_cfg=_pretrained(path)).init_weights()
    assert '(2, 2, 5, 2)' in str(err.value) and 'out_indices' in str(err.value)
    # stage 2 is not read with out_indices (0, 1): its missing block is then no error
    m = ConvNeXtV2('atto', out_indices=(0, 1), init_cfg=_pretrained(path))
    m.init_weights()


def test_shape_mismatch_is_an_error_unless_allowed(tmp_path):
    sd = _atto_sd()
    sd['stages.1.blocks.0.mlp.fc1.weight'] = torch.zeros(7, 80)
    path = tmp_path / 'bad_shape.pth'
    torch.save(sd, path)
    with pytest.raises(PretrainedLoadError, match=r'stages\.1\.blocks\.0\.mlp\.fc1\.weight'):
        ConvNeXtV2('atto', init_cfg=_pretrained(path)).init_weights()
    # the explicit option skips it (it is then missing, so stage 1 must not be required)
    m = ConvNeXtV2('atto', out_indices=(0,), init_cfg=_pretrained(
        path, allow_shape_mismatch=True, min_loaded_share=0.0))
    m.init_weights()
    own = m.state_dict()
    torch.testing.assert_close(own['stem.0.weight'], sd['stem.0.weight'])


def test_pos_embed_resize_stays_automatic(tmp_path):
    src = _tiny_vit(img_size=42, with_fpn=False)  # a 3x3 grid into a 4x4 model
    path = tmp_path / 'vit.pth'
    torch.save(src.state_dict(), path)
    m = _tiny_vit(init_cfg=_pretrained(path))
    m.init_weights()
    assert m.pos_embed.shape[1] == 17


def test_file_that_loads_nothing_or_too_little(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'encoder.foo.weight': torch.zeros(3)}, path)
    with pytest.raises(PretrainedLoadError, match='no tensor of the file matches') as err:
        ConvNeXtV2('atto', init_cfg=_pretrained(path)).init_weights()
    assert str(path) in str(err.value)
    # stem + stage 0 only: enough for out_indices (0,), but a small share of the backbone
    sd = {k: v for k, v in _atto_sd().items() if k.startswith(('stem.', 'stages.0.'))}
    path = tmp_path / 'stage0.pth'
    torch.save(sd, path)
    with pytest.raises(PretrainedLoadError, match=r'fills only \d') as err:
        ConvNeXtV2('atto', out_indices=(0,), init_cfg=_pretrained(path)).init_weights()
    assert str(path) in str(err.value)
    ConvNeXtV2('atto', out_indices=(0,),
               init_cfg=_pretrained(path, min_loaded_share=0.0)).init_weights()


def test_unknown_pretrained_option_is_refused(tmp_path):
    path = tmp_path / 'ok.pth'
    torch.save(_atto_sd(), path)
    with pytest.raises(ValueError, match='strict'):
        ConvNeXtV2('atto', init_cfg=_pretrained(path, strict=True)).init_weights()
