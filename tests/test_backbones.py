"""ConvNeXtV2 and InternViT backbones: shapes, local pretrained loading, checkpointing, dtype.

Everything runs on the CPU with random weights; checkpoints are written by the tests themselves
in the real key layouts (timm, official ConvNeXt-V2 / FCMAE, InternVL, HF InternViT).
"""
import re

import flora_mm  # noqa: F401  (compat shims before any OpenMMLab import)
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from flora_mm.models import ConvNeXtV2, InternViT

torch.manual_seed(0)


def _pretrained(path, **kw):
    return dict(type='Pretrained', checkpoint=str(path), **kw)


# ----------------------------------------------------------------------------- ConvNeXtV2
def _timm_atto():
    torch.manual_seed(1)
    return timm.create_model('convnextv2_atto', pretrained=False, num_classes=0).eval()


def timm_to_official(sd):
    """timm ConvNeXt-V2 keys -> official facebookresearch/ConvNeXt-V2 keys (the inverse of
    what the backbone must undo), with a 10-class classifier head added."""
    out = {}
    for k, v in sd.items():
        if k.startswith('stem.'):
            k = 'downsample_layers.0.' + k[len('stem.'):]
        elif m := re.match(r'stages\.(\d+)\.downsample\.(\d+)\.(.+)', k):
            k = f'downsample_layers.{m[1]}.{m[2]}.{m[3]}'
        elif m := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)', k):
            rest = m[3]
            if rest.startswith('mlp.grn.'):
                rest = 'grn.gamma' if rest.endswith('weight') else 'grn.beta'
                v = v.reshape(1, 1, 1, -1)
            else:
                rest = (rest.replace('conv_dw.', 'dwconv.').replace('mlp.fc1.', 'pwconv1.')
                        .replace('mlp.fc2.', 'pwconv2.'))
            k = f'stages.{m[1]}.{m[2]}.{rest}'
        elif k.startswith('head.norm.'):
            k = 'norm.' + k[len('head.norm.'):]
        out[k] = v.clone()
    out['head.weight'] = torch.randn(10, out['norm.weight'].shape[0])
    out['head.bias'] = torch.randn(10)
    return out


def official_to_sparse_fcmae(sd):
    """Official dense keys -> FCMAE pre-training (MinkowskiEngine encoder) keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith(('head.', 'norm.')):
            continue  # the FCMAE encoder has no final norm or head
        if re.match(r'downsample_layers\.[123]\.1\.weight', k):  # (out, in, 2, 2) -> (4, in, out)
            cout, cin = v.shape[:2]
            k = k.replace('.weight', '.kernel')
            v = v.transpose(3, 2).reshape(cout, cin, -1).permute(2, 1, 0)
        elif k.endswith('dwconv.weight'):  # (C, 1, 7, 7) -> (49, C)
            k = k.replace('.weight', '.kernel')
            v = v.transpose(3, 2).reshape(v.shape[0], -1).permute(1, 0)
        elif re.match(r'downsample_layers\.[123]\.1\.bias', k) or k.endswith('dwconv.bias'):
            v = v.reshape(1, -1)
        elif re.match(r'downsample_layers\.[123]\.0\.', k) or '.norm.' in k:
            k = k.rsplit('.', 1)[0] + '.ln.' + k.rsplit('.', 1)[1]
        elif 'pwconv' in k:
            k = k.rsplit('.', 1)[0] + '.linear.' + k.rsplit('.', 1)[1]
        elif 'grn' in k:
            v = v.reshape(1, -1)
        out['encoder.' + k] = v.contiguous()
    out['mask_token'] = torch.zeros(1, 512, 1, 1)
    out['decoder.0.weight'] = torch.zeros(512, 320, 1, 1)
    out['pred.weight'] = torch.zeros(48, 512, 1, 1)
    return out


def _assert_same_backbone_weights(model, ref_sd):
    own = model.state_dict()
    for k, v in ref_sd.items():
        if k.startswith('head.'):
            continue
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_convnextv2_atto_shapes():
    m = ConvNeXtV2('atto').eval()
    outs = m(torch.randn(2, 3, 64, 64))
    assert m.out_channels == [40, 80, 160, 320]
    assert [tuple(o.shape) for o in outs] == [
        (2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
    m2 = ConvNeXtV2('atto', out_indices=(1, 3), out_norm=False)
    assert m2.out_channels == [80, 320] and len(m2(torch.randn(1, 3, 32, 32))) == 2
    assert not any(k.startswith(('head.', 'norm')) for k in m2.state_dict())


def test_convnextv2_large_dims_on_meta():
    with torch.device('meta'):
        m = ConvNeXtV2('large')
    assert m.out_channels == [192, 384, 768, 1536]
    n = sum(p.numel() for n, p in m.named_parameters() if not n.startswith('norm'))
    assert round(n / 1e6, 1) == 196.4
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert len(convs) == 40 and len(linears) == 72


def test_convnextv2_frozen_stages():
    m = ConvNeXtV2('atto', frozen_stages=1)
    assert not any(p.requires_grad for p in m.stem.parameters())
    assert not any(p.requires_grad for p in m.stages[1].parameters())
    assert all(p.requires_grad for p in m.stages[2].parameters())


def test_convnextv2_checkpointing_matches_plain_backward():
    grads = []
    for with_cp in (True, False):
        torch.manual_seed(0)
        m = ConvNeXtV2('atto', out_indices=(3,), with_cp=with_cp).train()
        m.requires_grad_(False)
        target = m.stages[1].blocks[0].conv_dw.weight  # inside a frozen block
        target.requires_grad = True
        m(torch.randn(1, 3, 64, 64))[0].square().mean().backward()
        assert target.grad is not None
        grads.append(target.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize('layout', ['timm', 'timm_safetensors', 'official', 'fcmae_sparse'])
def test_convnextv2_pretrained_layouts(tmp_path, layout):
    ref = _timm_atto()
    ref_sd = ref.state_dict()
    if layout == 'timm':
        path = tmp_path / 'timm.pth'
        torch.save(ref_sd, path)
    elif layout == 'timm_safetensors':
        path = tmp_path / 'timm.safetensors'
        save_file({k: v.contiguous() for k, v in ref_sd.items()}, str(path))
    elif layout == 'official':
        path = tmp_path / 'convnextv2_atto_1k_224_ema.pt'
        official = timm_to_official(ref_sd)
        assert 'stages.2.5.pwconv1.weight' in official
        assert 'downsample_layers.3.1.weight' in official
        torch.save({'model': official}, path)
    else:
        path = tmp_path / 'convnextv2_atto_1k_224_fcmae.pt'
        torch.save({'model': official_to_sparse_fcmae(timm_to_official(ref_sd))}, path)

    m = ConvNeXtV2('atto', out_norm=False, init_cfg=_pretrained(path)).eval()
    missing, unexpected = m.load_pretrained(str(path))
    assert missing == []
    assert all(k.startswith(('mask_token', 'decoder', 'pred')) for k in unexpected)
    _assert_same_backbone_weights(m, ref_sd)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = m(x)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_convnextv2_init_weights_with_adapter_like_modules(tmp_path):
    """Adapter layers replace modules but keep .weight/.bias: loading must go by key."""

    class FakeAdapter(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.weight, self.bias = base.weight, base.bias
            self.lora_A = nn.Parameter(torch.zeros(2, 2))

    ref_sd = _timm_atto().state_dict()
    path = tmp_path / 'official.pth'
    torch.save({'model': timm_to_official(ref_sd)}, path)
    m = ConvNeXtV2('atto', init_cfg=_pretrained(path))
    blk = m.stages[0].blocks[0]
    blk.conv_dw = FakeAdapter(blk.conv_dw)
    blk.mlp.fc1 = FakeAdapter(blk.mlp.fc1)
    m.init_weights()
    assert m.is_init
    _assert_same_backbone_weights(m, ref_sd)
    missing, _ = m.load_pretrained(str(path))
    assert sorted(missing) == sorted(
        ['stages.0.blocks.0.conv_dw.lora_A', 'stages.0.blocks.0.mlp.fc1.lora_A']
        + [f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')])


def test_convnextv2_bad_checkpoints(tmp_path):
    missing = tmp_path / 'nonexistent_ckpt.pth'
    with pytest.raises(FileNotFoundError, match='nonexistent_ckpt.pth'):
        ConvNeXtV2('atto', init_cfg=_pretrained(missing)).init_weights()
    with pytest.raises(ValueError, match='local'):
        ConvNeXtV2('atto', init_cfg=_pretrained('https://example.com/x.pth')).init_weights()
    with pytest.raises(ValueError):
        ConvNeXtV2('atto', init_cfg=_pretrained('hf-hub:timm/convnextv2_atto')).init_weights()


# ----------------------------------------------------------------------------- InternViT
def _tiny(**kw):
    kw.setdefault('img_size', 56)
    return InternViT('tiny', **kw)


def internvl_to_hf(sd):
    """InternVL segmentation keys -> HF InternViT release keys (InternVisionModel)."""
    out = {}
    for k, v in sd.items():
        if k.startswith('up'):
            continue
        k = {'cls_token': 'embeddings.class_embedding',
             'pos_embed': 'embeddings.position_embedding'}.get(k, k)
        k = k.replace('patch_embed.proj.', 'embeddings.patch_embedding.')
        if k.startswith('blocks.'):
            k = 'encoder.layers.' + k[len('blocks.'):]
            k = re.sub(r'\.(ls[12])\.gamma$', r'.\1', k)
        out[k] = v.clone()
    return out


def test_internvit_fpn_shapes():
    m = _tiny().eval()
    assert m.out_indices == (0, 1, 2, 3) and m.out_channels == [64] * 4
    outs = m(torch.randn(2, 3, 56, 56))
    assert [tuple(o.shape) for o in outs] == [
        (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    m = _tiny(with_fpn=False, out_indices=(1, 3)).eval()
    assert [tuple(o.shape) for o in m(torch.randn(1, 3, 56, 56))] == [(1, 64, 4, 4)] * 2


def test_internvit_pos_embed_interpolation():
    """A 70x42 input on a 56x56 model equals a 70x42 model given the resampled pos-embed."""
    a = _tiny().eval()
    b = _tiny(img_size=(70, 42)).eval()
    sd = a.state_dict()
    sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], new_size=(5, 3), old_size=(4, 4),
                                             num_prefix_tokens=1, antialias=False)
    b.load_state_dict(sd)
    x = torch.randn(1, 3, 70, 42)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    assert [tuple(o.shape[-2:]) for o in out_a] == [(20, 12), (10, 6), (5, 3), (2, 1)]
    for p, q in zip(out_a, out_b):
        torch.testing.assert_close(p, q)


def test_internvit_attention_is_internvl_attention():
    """qk-norm is one RMSNorm over all heads (InternViT-6B), not timm's per-head norm."""
    attn = _tiny().blocks[0].attn.eval()
    nn.init.normal_(attn.q_norm.weight)
    nn.init.normal_(attn.k_norm.weight)
    x = torch.randn(2, 5, 64)

    def rms(t, w):  # InternVL's RMSNorm, eps 1e-6
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    # InternVL segmentation/intern_vit_6b.py Attention._naive_attn, written out
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = rms(q.transpose(1, 2).flatten(-2, -1), attn.q_norm.weight).view(B, N, 2, 32).transpose(1, 2)
    k = rms(k.transpose(1, 2).flatten(-2, -1), attn.k_norm.weight).view(B, N, 2, 32).transpose(1, 2)
    a = ((q * 32 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)


def test_internvit_presets_on_meta():
    with torch.device('meta'):
        big = InternViT('6b', with_fpn=False)
        vit300 = InternViT('300m', with_fpn=False)
        ref300 = timm.create_model('vit_intern300m_patch14_448', pretrained=False, num_classes=0)
    assert big.out_indices == (11, 23, 35, 47) and big.out_channels == [3200] * 4
    assert big.blocks[0].attn.q_norm.weight.shape == (3200,)
    assert big.blocks[0].attn.qkv.bias is None
    assert round(sum(p.numel() for p in big.parameters()) / 1e9, 1) == 5.9
    assert vit300.out_indices == (5, 11, 17, 23)
    assert {k: v.shape for k, v in vit300.state_dict().items()} == \
        {k: v.shape for k, v in ref300.state_dict().items()}


@pytest.mark.parametrize('layout', ['internvl', 'hf'])
def test_internvit_pretrained_layouts(tmp_path, layout):
    src = _tiny(img_size=42)  # pre-trained at a 3x3 grid, loaded into a 4x4 model
    src_sd = {k: v for k, v in src.state_dict().items() if not k.startswith('up')}
    if layout == 'internvl':
        path = tmp_path / 'intern_vit_tiny.pth'
        torch.save({'module': src_sd}, path)  # InternVL's DeepSpeed-style wrapper
    else:
        path = tmp_path / 'model.safetensors'
        hf = {'vision_model.' + k: v for k, v in internvl_to_hf(src_sd).items()}
        assert 'vision_model.encoder.layers.3.ls2' in hf
        hf['mlp1.0.weight'] = torch.zeros(4, 4)  # the chat model's projector, not the ViT
        save_file(hf, str(path))

    m = _tiny(init_cfg=_pretrained(path))
    m.init_weights()
    missing, unexpected = m.load_pretrained(str(path))
    assert unexpected == [] and all(k.startswith('up') for k in missing)
    own = m.state_dict()
    for k, v in src_sd.items():
        if k != 'pos_embed':
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    expected_pos = resample_abs_pos_embed(src_sd['pos_embed'], new_size=(4, 4), old_size=(3, 3),
                                          num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(own['pos_embed'], expected_pos)
    torch.testing.assert_close(own['blocks.2.ls1.gamma'], src_sd['blocks.2.ls1.gamma'])


def test_internvit_checkpointing_gives_grad_in_frozen_block():
    torch.manual_seed(0)
    grads = []
    for with_cp in (True, False):
        torch.manual_seed(0)
        m = _tiny(img_size=28, with_cp=with_cp, with_fpn=False).train()
        for p in m.parameters():
            p.requires_grad = False
        target = m.blocks[1].attn.proj.weight
        target.requires_grad = True
        x = torch.randn(2, 3, 28, 28)
        assert not x.requires_grad
        sum(o.square().mean() for o in m(x)).backward()
        assert target.grad is not None and target.grad.abs().sum() > 0
        grads.append(target.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_internvit_bfloat16():
    torch.manual_seed(0)
    ref = _tiny(img_size=28).eval()
    m = _tiny(img_size=28, dtype='bfloat16').eval()
    m.load_state_dict(ref.state_dict())
    assert m.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert m.pos_embed.dtype == torch.bfloat16
    assert m.up1[0].weight.dtype == torch.float32
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        outs, ref_outs = m(x), ref(x)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o - r).norm() / r.norm() < 0.05


# ----------------------------------------------------------------------------- registries
def test_build_through_openmmlab_registries():
    from mmdet.registry import MODELS as DET
    from mmrotate.registry import MODELS as ROT
    from mmseg.registry import MODELS as SEG

    for registry in (DET, SEG, ROT):
        cnx = registry.build(dict(type='ConvNeXtV2', arch='atto', out_indices=(1, 2, 3)))
        vit = registry.build(dict(type='InternViT', arch='tiny', img_size=28))
        assert isinstance(cnx, ConvNeXtV2) and cnx.out_channels == [80, 160, 320]
        assert isinstance(vit, InternViT) and vit.out_channels == [64] * 4


def test_convnextv2_outputs_are_contiguous_nchw():
    """mmcv's CPU RoIAlign reads raw NCHW memory: channels-last views gave garbage RoI features."""
    backbone = ConvNeXtV2(arch='atto')
    for out in backbone(torch.randn(1, 3, 64, 64)):
        assert out.is_contiguous()
