"""flora_mm.harness.compare end to end on tiny ADE20K.

Two methods (LoRA and FLoRA at one budget, ranks solved) are trained for one epoch (2
iterations of 4 of the 8 images) with the real tools/train.py and tested with tools/test.py.
(Segmentation always scores; a detector this young finds nothing and COCO scores nothing.)
Checked against independent sources:
- the table's ``# Params`` equal tools/count_params.py's per-method trainable count less the
  output norms (which every method trains; their size comes from the architecture here);
- the table's metrics equal the test run's own results file, and the validation that
  tools/train.py ran on the same set with the same final weights (a separate process);
- compare.png is a valid PNG of the stated size with one series per method per panel;
- a second call skips both runs and starts no process.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import os.path as osp
import struct

import pytest

from flora_mm.apis.count import count_params
from flora_mm.datasets.checkpoints import generate_checkpoints
from flora_mm.datasets.tiny import generate
from flora_mm.harness import compare as C

from ._methods import method_cls, method_names, second_rank

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY_ADE = osp.join(ROOT, 'configs/ade20k/tiny/convnextv2_flora_r16.py')

ATTO_NORMS = 2 * (40 + 80 + 160 + 320)  # norm0..3 of ConvNeXt-V2-atto: trained by every method


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp('compare')
    generate(str(root / 'data/tiny'), tasks=['ade20k'], num_train=8, num_val=4)
    generate_checkpoints(str(root / 'data/tiny'))
    options = C.RunOptions(cwd=str(root), max_epochs=1, max_iters=2,
                           env=dict(OMP_NUM_THREADS='2'))
    out = str(root / 'out')
    lines: list[str] = []
    result = C.compare([TINY_ADE], out, methods=['LoRA', 'FLoRA'], budgets=['2%'],
                       options=options, log=lines.append)
    return dict(root=root, out=out, options=options, result=result, log=lines)


def _val_metrics(train_dir: str) -> dict:
    """The scores of the validation tools/train.py ran after its last iteration (mmengine's
    visualizer scalars of the training run)."""
    paths = glob.glob(osp.join(train_dir, '*', 'vis_data', 'scalars.json'))
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    scored = [r for r in records if 'mIoU' in r]
    assert len(scored) == 1, scored
    return scored[0]


def test_table_counts_and_metrics(compared):
    result, out = compared['result'], compared['out']
    rows = result['table']['rows']
    assert [r['method'] for r in rows] == ['LoRA', 'FLoRA']
    with open(result['files']['csv']) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r['method'] for r in csv_rows] == ['LoRA', 'FLoRA']
    for run, row, csv_row in zip(result['results'], rows, csv_rows):
        # parameter counts: count_params on the run's own config
        counted = count_params(run['run_config'])
        method_params = counted['per_method'][run['method']]['trainable'] - ATTO_NORMS
        assert row['params']['ADE20K'] == method_params == int(csv_row['params/ADE20K'])
        assert run['counts']['model_trainable'] == counted['trainable']
        assert run['rank'] == json.load(open(osp.join(run['run_dir'], 'result.json')))['rank']
        # metrics: the run's test results file and the training's own validation
        test_dirs = glob.glob(osp.join(run['run_dir'], 'test', '*', '*.json'))
        with open(test_dirs[0]) as f:
            tested = [json.loads(line) for line in f if line.strip()][-1]
        validated = _val_metrics(osp.join(run['run_dir'], 'train'))
        for column in ('mAcc', 'mIoU'):
            assert tested[column] == validated[column]  # two processes, same weights and data
            assert row['metrics'][('ADE20K', column)] == tested[column]
            assert float(csv_row[f'ADE20K/{column}']) == pytest.approx(tested[column])
        assert row['avg'] == pytest.approx((tested['mAcc'] + tested['mIoU']) / 2)
        assert run['sec_per_iter'] > 0 and run['peak_memory_mb'] > 50
    markdown = open(result['files']['md']).read()
    for row in rows:
        assert f'{row["method"]} r{row["rank"]}' in markdown
        assert C.B.format_count(row['params']['ADE20K']) in markdown
    assert json.load(open(result['files']['json']))['rows'][0]['method'] == 'LoRA'
    assert osp.isdir(out)


def test_png(compared):
    result = compared['result']
    path = result['files']['png']
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR'
    width, height = struct.unpack('>II', head[16:24])
    assert [width, height] == result['figure']['size'] == [
        round(C.PANEL_INCHES[0] * C.DPI), round((C.PANEL_INCHES[1] + 0.6) * C.DPI)]
    from PIL import Image
    with Image.open(path) as img:
        img.verify()
    assert result['figure']['series'] == {'ADE20K mIoU': ['LoRA', 'FLoRA']}


def test_rerun_skips_finished_runs(compared):
    before = sorted(glob.glob(osp.join(compared['out'], '**', '*'), recursive=True))
    lines: list[str] = []
    again = C.compare([TINY_ADE], compared['out'], methods=['LoRA', 'FLoRA'], budgets=['2%'],
                      options=compared['options'], log=lines.append)
    assert all(r['skipped'] for r in again['results'])
    assert sum('skipped' in line for line in lines) == 2
    assert not any('training' in line or 'testing' in line for line in lines)
    after = sorted(glob.glob(osp.join(compared['out'], '**', '*'), recursive=True))
    assert before == after  # no new work dirs, logs or checkpoints
    assert again['table']['rows'] == compared['result']['table']['rows']


def test_changed_run_is_refused(compared):
    spec = C.plan_runs([TINY_ADE], ['LoRA'], ['2%'], log=lambda _: None)[0]
    spec.peft = dict(spec.peft, rank=spec.peft['rank'] + 1)
    with pytest.raises(C.CompareError, match='different config'):
        C.execute(spec, compared['out'], compared['options'], log=lambda _: None)
    assert os.listdir(compared['out'])


# ----------------------------------------------------------------------------- every method
# planning, table order, labels and plot styles without training: what each method declares
@pytest.mark.parametrize('method', method_names())
def test_plan_for_every_method(method):
    cls, (second, _) = method_cls(method), second_rank(method)
    spec, = C.plan_runs([TINY_ADE], [method], ['2%'], log=lambda _: None)
    assert spec.method == method and spec.peft['type'] == method
    if cls.budget_rank is None:  # one run of the method as it is
        assert (spec.budget, spec.rank, spec.kernel_rank) == (None, None, None)
        assert spec.name == f'convnextv2_flora_r16-{method.lower()}'
    else:  # one run per budget, the ranks solved
        sol = C.B.solve_rank(TINY_ADE, '2%', method=method)
        assert (spec.budget, spec.rank, spec.kernel_rank) == ('2%', sol.rank, sol.kernel_rank)
        assert spec.peft == sol.peft and spec.peft[cls.budget_rank] == sol.rank
        assert spec.kernel_rank == (spec.peft[second] if second else None)
        assert spec.name == f'convnextv2_flora_r16-{method.lower()}_2pct'
        # without budgets: the method's own default rank
        spec, = C.plan_runs([TINY_ADE], [method], log=lambda _: None)
        assert spec.rank == getattr(cls, cls.budget_rank) and spec.budget is None


def _fake_result(method: str, params: int, rank=None, kernel_rank=None, budget=None) -> dict:
    """A run's result as ``execute`` stores it, for the tables and the plot."""
    return dict(task='ADE20K', backbone='ConvNeXtV2-atto', method=method, budget=budget,
                rank=rank, kernel_rank=kernel_rank, run_config=TINY_ADE, run_dir=f'/r/{method}',
                peft=dict(type=method, rank=rank), metrics=dict(mAcc=50.0, mIoU=30.0 + params),
                counts=dict(method_params=params, backbone_params=10 ** 6), sec_per_iter=0.5,
                peak_memory_mb=100.0, memory_kind='cpu peak rss')


def test_table_order_labels_and_plot_come_from_the_methods(tmp_path):
    results = []
    for i, method in enumerate(reversed(method_names())):  # the table orders them
        cls = method_cls(method)
        params = 1000 * (i + 1) if cls.trains_module else 0
        if cls.budget_rank is None:
            results.append(_fake_result(method, params))
        else:
            results.append(_fake_result(method, params, rank=4, budget='2%',
                                        kernel_rank=2 if second_rank(method)[0] else None))
    table = C.build_table(results)
    assert [r['method'] for r in table['rows']] == method_names()
    lines = C.format_markdown(table).splitlines()
    first = lines.index('| --- | ---: | ---: | ---: | ---: |') + 1  # Table 1's body
    body = [line.split(' | ') for line in lines[first:first + len(method_names())]]
    labels = [cells[0][2:] for cells in body]
    assert labels[:6] == ['Base', 'Fully FT', 'BitFit', 'LoRA r4', 'DoRA r4', 'FLoRA r4/2']
    for method, label, cells in zip(method_names(), labels, body):
        assert label.startswith(method_cls(method).label)
        assert (cells[1] == '-') == (not method_cls(method).trains_module)  # # Params
    figure = C.plot(table, str(tmp_path / 'compare.png'))
    assert figure['series'] == {'ADE20K mIoU': [method_cls(m).label for m in method_names()]}


def test_builtin_methods_plot_apart():
    """flora_mm's own methods (nine in `make compare`) each have their own colour and, where
    they draw markers, their own marker."""
    own = [method_cls(m) for m in method_names()
           if method_cls(m).__module__.startswith('flora_mm.')]
    assert len(own) >= 9
    colors = [cls.plot_style[0] for cls in own]
    markers = [cls.plot_style[1] for cls in own if cls.plot_style[1] is not None]
    assert len(set(colors)) == len(colors) and len(set(markers)) == len(markers)


def test_rank_labels_at_one_point_do_not_overlap():
    """Methods that land on the same point (same score, matched budget) get their rank labels
    stacked inside the axes, not printed over each other."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=C.DPI)
    ax.plot([1e4, 1e6], [0.0, 30.0])
    ax.set_xscale('log')
    C._place_rank_labels(ax, [(6.5e4, 0.0, f'r{i}', 'k') for i in range(4)])
    offsets = [text.xyann for text in ax.texts]
    assert len(offsets) == 4 and len({dy for _, dy in offsets}) == 4
    assert all(dy > 0 for _, dy in offsets)  # at the bottom edge: stacked upwards, inside
    plt.close(fig)
