"""flora_mm/harness/host_memory.py without running anything: the generated config, the table
of the phase records, the bad-input errors (the measured runs are in docs/sharding.md)."""
from __future__ import annotations

import os.path as osp

import pytest

from flora_mm.cli.measure_host_memory import parse_args
from flora_mm.harness import host_memory as hm

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_generated_config_scales_the_tiny_config(tmp_path):
    from mmengine.config import Config
    arch = hm.arch_dict(128, 8, 4)
    for method in hm.METHODS:
        path = tmp_path / f'{method}.py'
        path.write_text(hm.config_text(ROOT, method, True, arch, 'bfloat16', '/x/pre.pth'))
        cfg = Config.fromfile(str(path))
        vit = cfg.model.backbone.backbone
        assert vit.arch == arch and vit.dtype == 'bfloat16' and vit.out_indices == (1, 3, 5, 7)
        assert vit.init_cfg.checkpoint == '/x/pre.pth'
        assert cfg.model.decode_head.in_channels == [128] * 4
        assert cfg.model_wrapper_cfg.meta_init is True and cfg.runner_type == 'FSDPRunner'
        assert cfg.optim_wrapper.paramwise_cfg.num_layers == 8
        assert (cfg.model.backbone.peft.type == 'Full') == (method == 'full')
    with pytest.raises(ValueError, match='method'):
        hm.config_text(ROOT, 'lora', True, arch, 'bfloat16', 'p')


def test_bad_sizes_and_options_are_refused(capsys):
    with pytest.raises(ValueError, match='multiple of num_heads'):
        hm.arch_dict(100, 8, 3)
    with pytest.raises(ValueError, match='depth'):
        hm.arch_dict(64, 2, 2)
    with pytest.raises(SystemExit) as exc:
        parse_args(['--embed-dim', '100', '--num-heads', '3'])
    assert exc.value.code == 2 and 'multiple of num_heads' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(['--save-formats', 'zip'])
    with pytest.raises(RuntimeError, match='min-available-gib'):
        hm.wait_for_memory(2 ** 60, wait_s=0)


def test_table_of_phase_records(tmp_path):
    def ranks(start, load, save, shard):
        return [[dict(phase='start', peak_rss_mib=start, resettable=None),
                 dict(phase='setup', peak_rss_mib=1, resettable=True),
                 dict(phase='train', peak_rss_mib=1, rss_mib=1, resettable=True),
                 dict(phase='save', peak_rss_mib=save, resettable=True,
                      shard_bytes=dict(params=shard * 2**20, grads=0, optimizer=0))]] * 2, \
            [[dict(phase='start', peak_rss_mib=start), dict(phase='load', peak_rss_mib=load)]] * 2
    first, second = ranks(3000, 2500, 4000, 1024)
    result = dict(method='flora', start='meta', save_format='full', arch=hm.arch_dict(64, 4, 2),
                  dtype='bfloat16', procs=2, runs=[dict(ranks=first), dict(ranks=second)])
    rows = hm.summarise(result)
    assert [r['rank'] for r in rows] == [0, 1]
    assert rows[0]['start_mib'] == 3000 and rows[0]['load_mib'] == 2500
    assert rows[0]['shard_mib'] == 1024
    line = hm.markdown(rows).splitlines()[2]
    # 3000 MiB <= 1024 + 2048: met; 4000 MiB: not
    assert '| 2.93 | 2.44 | 3.91 | 1.00 | yes | no |' in line
    with pytest.raises(FileNotFoundError, match='host_memory_rank0.json'):
        hm.read_phases(str(tmp_path), 2)
