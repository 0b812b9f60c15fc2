"""results_table.py on a real sweep (2 set-ups x 2 seeds) and on hand-made run folders."""
import json
import math

import pandas as pd
import pytest

import results_table
import run as sweeps
from utils import DataError

TINY = ('--model convnext_atto --input_size 32 --batch_size 8 --num_workers 0 --test_val_ratio 0.25 0.25 '
        '--drop_path 0 --warmup_epochs 0 --epochs 1')


def test_real_sweep_grouped_by_setup_mean_and_spread_over_seeds(elpv_small, tmp_path, capsys):
    sweep_dir = tmp_path / 'sweep'
    sweeps.main(['--sweep_dir', str(sweep_dir), '--base', f'--data_path {elpv_small} {TINY}',
                 '--grid', 'seed=0,1', 'nb_classes=2,4'])
    out = tmp_path / 'csv' / 'table.csv'
    df = results_table.main(['--runs', str(sweep_dir / 'runs'), '--out', str(out)])
    assert list(df['setup']) == ['nb_classes=2', 'nb_classes=4'] and list(df['runs']) == [2, 2]
    status = pd.read_csv(sweep_dir / 'status.csv').set_index('name')
    for _, row in df.iterrows():
        nb = row['setup'].split('=')[1]
        runs = [sweep_dir / 'runs' / f'nb_classes-{nb}_seed-{s}' for s in (0, 1)]
        acc = [json.loads((r / 'metrics.json').read_text())['acc'] for r in runs]
        assert row['acc_mean'] == pytest.approx(sum(acc) / 2)
        assert row['acc_std'] == pytest.approx(abs(acc[0] - acc[1]) / math.sqrt(2))
        assert row['minutes'] == pytest.approx(sum(status.loc[r.name, 'seconds'] for r in runs) / 2 / 60)
    assert math.isnan(df.loc[0, 'acc4_mean']) and not math.isnan(df.loc[1, 'acc4_mean'])  # 4-class head only
    text = (tmp_path / 'csv' / 'table.md').read_text()
    assert text in capsys.readouterr().out
    line2 = [x for x in text.splitlines() if x.startswith('| nb_classes=2')][0]
    assert line2.split('|')[-3].strip() == '-' and ' ± ' in line2  # acc4 cell of the 2-class row
    assert pd.read_csv(out)['runs'].tolist() == [2, 2]


def fake_run(folder, args, metrics=None, log_times=()):
    folder.mkdir(parents=True)
    (folder / 'args.json').write_text(json.dumps(args))
    if metrics is not None:
        (folder / 'metrics.json').write_text(json.dumps(metrics))
    (folder / 'log.txt').write_text(''.join(json.dumps({'epoch': i, 'time_s': t}) + '\n'
                                            for i, t in enumerate(log_times)))


def test_pretraining_time_counted_and_bad_input(tmp_path):
    pre = tmp_path / 'fcmae' / 'runs' / 'seed-0'
    fake_run(pre, {'pretrain': True, 'seed': 0}, log_times=(60, 60, 60))
    (pre / 'encoder.pth').write_bytes(b'x')
    (tmp_path / 'fcmae' / 'status.csv').write_text('name,state,exit_code,seconds,log_tail\nseed-0,finished,0,600.0,\n')
    runs = tmp_path / 'ft' / 'runs'
    for seed, acc in ((0, 0.7), (1, 0.8)):
        fake_run(runs / f's{seed}', {'seed': seed, 'finetune': str(pre / 'encoder.pth'), 'output_dir': f'o{seed}'},
                 {'acc': acc}, log_times=(30, 30))
    df = results_table.table(results_table.collect([runs]))
    assert len(df) == 1 and df.loc[0, 'setup'] == 'all'
    assert df.loc[0, 'minutes'] == pytest.approx((600 + 60) / 60)  # status.csv beats the log's epoch times
    assert df.loc[0, 'acc_mean'] == pytest.approx(0.75)
    fake_run(runs / 'scratch', {'seed': 0, 'finetune': '', 'output_dir': 'o'}, {'acc': 0.6}, log_times=(30, 30))
    df = results_table.table(results_table.collect([runs])).set_index('setup')
    assert df.loc['finetune=none', 'minutes'] == pytest.approx(1.0)  # no pretraining to count
    assert df.loc[f'finetune={pre / "encoder.pth"}', 'runs'] == 2
    (runs / 's1' / 'metrics.json').write_text('{not json')
    with pytest.raises(DataError, match='s1/metrics.json: unreadable JSON'):
        results_table.collect([runs])
    with pytest.raises(DataError, match='no finished run'):
        results_table.collect([tmp_path / 'fcmae'])
    with pytest.raises(DataError, match='no such folder'):
        results_table.collect([tmp_path / 'missing'])


def test_new_rows_named_and_earlier_table_appended(tmp_path, capsys):
    runs = tmp_path / 'runs'
    for seed, acc in ((0, 0.8), (1, 0.9)):
        fake_run(runs / f's{seed}', {'seed': seed, 'nb_classes': 2}, {'acc': acc, 'acc4': 0.5}, log_times=(60,))
    old = tmp_path / 'old.csv'
    results_table.main(['--runs', str(runs), '--name', 'older', '--out', str(old)])
    fake_run(runs / 's4', {'seed': 0, 'nb_classes': 4}, {'acc': 0.7}, log_times=(120,))
    df = results_table.main(['--runs', str(runs), '--name', 'new', '--previous', str(old),
                             '--out', str(tmp_path / 'both.csv')])
    assert df['setup'].tolist() == ['new: nb_classes=2', 'new: nb_classes=4', 'older']
    assert df['acc_mean'].tolist() == pytest.approx([0.85, 0.7, 0.85])
    assert '| older | 2 | 0.850 ± 0.071 | 0.500 ± 0.000 | 1.0 |' in (tmp_path / 'both.md').read_text()
    (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
    with pytest.raises(DataError, match='bad.csv: not a results_table.py CSV'):
        results_table.main(['--runs', str(runs), '--previous', str(tmp_path / 'bad.csv')])


def test_ema_weights_give_their_own_row(tmp_path):
    runs = tmp_path / 'runs'
    for seed, acc, ema_acc in ((0, 0.8, 0.84), (1, 0.9, 0.9)):
        ema_flags = {'model_ema': True, 'model_ema_decay': 0.998, 'model_ema_eval': True}
        fake_run(runs / f's{seed}', {'seed': seed, **ema_flags}, {'acc': acc}, log_times=(60,))
        (runs / f's{seed}' / 'metrics_ema.json').write_text(json.dumps({'acc': ema_acc}))
    # a seed trained without EMA joins the row of the best weights (EMA leaves the training as it is)
    fake_run(runs / 's2', {'seed': 2, 'model_ema': False, 'model_ema_eval': False}, {'acc': 0.7}, log_times=(60,))
    df = results_table.table(results_table.collect([runs])).set_index('setup')
    assert df.loc['weights=best', 'acc_mean'] == pytest.approx(0.8) and df.loc['weights=best', 'seeds'] == '0 1 2'
    assert df.loc['model_ema_decay=0.998 weights=best EMA', 'acc_mean'] == pytest.approx(0.87)
    assert df['runs'].tolist() == [3, 2] and df['minutes'].tolist() == pytest.approx([1.0, 1.0])


def test_a_flag_a_run_lacks_counts_as_its_default(tmp_path):
    runs = tmp_path / 'runs'
    fake_run(runs / 'old', {'seed': 0}, {'acc': 0.7}, log_times=(60,))  # saved before --clahe existed
    fake_run(runs / 'new', {'seed': 1, 'clahe': 0.0}, {'acc': 0.8}, log_times=(60,))
    fake_run(runs / 'contrast', {'seed': 0, 'clahe': 2.0}, {'acc': 0.9}, log_times=(60,))
    df = results_table.table(results_table.collect([runs])).set_index('setup')
    assert df.loc['clahe=0.0', 'seeds'] == '1 0' and df.loc['clahe=0.0', 'acc_mean'] == pytest.approx(0.75)
    assert df.loc['clahe=2.0', 'runs'] == 1 and len(df) == 2
