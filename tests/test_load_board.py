"""load_board.py on real event files written by short trainings."""
import json
import math

import pandas as pd
import pytest

import load_board
import main as cli
from conftest import train_argv
from utils import DataError


@pytest.fixture(scope='module')
def board(elpv_small, tmp_path_factory):
    """Two runs logging into one TensorBoard root; the second one interrupted and resumed (two event files)."""
    root = tmp_path_factory.mktemp('board')
    tb = root / 'tb'
    cli.main([str(a) for a in train_argv(elpv_small, root / 'a', '--epochs', '3', '--log_dir', tb, '--log_name',
                                         'run_a', '--test', 'False')])
    real = cli.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cli.train_one_epoch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main([str(a) for a in train_argv(elpv_small, root / 'b', '--epochs', '3', '--log_dir', tb,
                                                 '--log_name', 'run_b', '--lr', '3e-3', '--test', 'False')])
    finally:
        cli.train_one_epoch = real
    cli.main([str(a) for a in train_argv(elpv_small, root / 'b', '--epochs', '3', '--log_dir', tb, '--log_name',
                                         'run_b', '--lr', '3e-3', '--test', 'False', '--auto_resume', 'True')])
    return root, tb


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / 'log.txt').read_text().splitlines()]


def test_export_runs_and_summary(board, tmp_path):
    root, tb = board
    summary = load_board.main(['--path', str(tb), '--out', str(tmp_path / 'csv'), '--metric', 'val/ece'])
    assert sorted(summary['run']) == ['run_a', 'run_b']
    table = pd.read_csv(tmp_path / 'csv' / 'run_a.csv')
    assert {'step', 'wall_time', 'train/loss', 'train/lr', 'val/auroc', 'val/ece'} <= set(table.columns)
    assert table['val/auroc'].dropna().size == 3
    saved = pd.read_csv(tmp_path / 'csv' / 'summary.csv')
    assert list(saved.columns) == list(summary.columns)
    assert saved['val/ece/best'].is_monotonic_increasing  # ranked by ECE, lower first
    for run, folder in (('run_a', root / 'a'), ('run_b', root / 'b')):
        row = saved[saved['run'] == run].iloc[0]
        records = log_records(folder)
        aurocs = [r['val_auroc'] for r in records]
        eces = [r['val_ece'] for r in records]
        assert row['val/auroc/last'] == pytest.approx(aurocs[-1], abs=1e-6)
        assert row['val/auroc/best'] == pytest.approx(max(aurocs), abs=1e-6)
        assert row['val/auroc/best_step'] == aurocs.index(max(aurocs))
        assert row['val/ece/best'] == pytest.approx(min(eces), abs=1e-6)
        assert json.loads(row['arg.data_path']) and row['arg.lr'] == (3e-3 if run == 'run_b' else 1e-3)


def test_resumed_run_merged_without_duplicates(board, tmp_path):
    _, tb = board
    assert len(list((tb / 'run_b').glob('events.out.tfevents.*'))) == 2
    long = load_board.read_run(tb / 'run_b')
    assert not long.duplicated(['tag', 'step']).any()
    assert sorted(long[long['tag'] == 'val/auroc']['step']) == [0, 1, 2]


def test_truncated_event_file_warns_and_exports_the_rest(board, tmp_path, caplog):
    import shutil
    _, tb = board
    copy = tmp_path / 'tb'
    shutil.copytree(tb, copy)
    event = sorted((copy / 'run_a').glob('events.out.tfevents.*'))[0]
    data = event.read_bytes()
    event.write_bytes(data[:len(data) * 2 // 3] + b'\x00garbage')
    summary = load_board.export(copy, tmp_path / 'csv', plot=True)
    assert 'damaged event file' in caplog.text and event.name in caplog.text
    row = summary[summary['run'] == 'run_a'].iloc[0]
    assert not math.isnan(row['val/auroc/best'])
    assert len(summary) == 2
    assert (tmp_path / 'csv' / 'curve_val__auroc.png').is_file()
    assert (tmp_path / 'csv' / 'best_val__auroc.png').is_file()


def test_columns_stable_and_tag_filter(board, tmp_path):
    _, tb = board
    a = load_board.export(tb, tmp_path / 'one')
    b = load_board.export(tb, tmp_path / 'two')
    assert (tmp_path / 'one' / 'summary.csv').read_text() == (tmp_path / 'two' / 'summary.csv').read_text()
    assert list(a.columns) == list(b.columns)
    load_board.export(tb, tmp_path / 'val', tags=['val/*'])
    cols = pd.read_csv(tmp_path / 'val' / 'run_a.csv').columns
    assert 'train/loss' not in cols and 'val/auroc' in cols


def test_empty_logdir_is_an_error(tmp_path):
    with pytest.raises(DataError, match=f'{tmp_path}: no TensorBoard event file'):
        load_board.export(tmp_path, tmp_path / 'csv')
