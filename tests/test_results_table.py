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
    only2 = tmp_path / 'runs2'  # new runs without a 4-class head above a table with one: the same columns
    fake_run(only2 / 's0', {'seed': 0, 'nb_classes': 2}, {'acc': 0.6}, log_times=(60,))
    df = results_table.main(['--runs', str(only2), '--ensemble', '2', '--name', 'two', '--previous', str(old),
                             '--out', str(tmp_path / 'three.csv')])
    assert df['setup'].tolist() == ['two', 'older']
    assert (tmp_path / 'three.csv').read_text().splitlines()[0] == ','.join(pd.read_csv(old).columns)
    (tmp_path / 'bad.csv').write_text('a,b\n1,2\n')
    with pytest.raises(DataError, match='bad.csv: not a results_table.py CSV'):
        results_table.main(['--runs', str(runs), '--previous', str(tmp_path / 'bad.csv')])
    header, *rows = old.read_text().splitlines()  # a set-up edited by hand, its comma left unquoted
    (tmp_path / 'edited.csv').write_text('\n'.join([header, 'older, seed 0' + rows[0][len('older'):], *rows[1:]]))
    with pytest.raises(DataError, match='edited.csv: a row has more fields than the header'):
        results_table.main(['--runs', str(runs), '--previous', str(tmp_path / 'edited.csv')])


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


def test_compiled_and_eager_seeds_form_one_setup(tmp_path):
    runs = tmp_path / 'runs'  # --compile auto compiles on one machine and not on another: the same set-up
    fake_run(runs / 'eager', {'seed': 0, 'compile': False, 'lr': 1e-3}, {'acc': 0.7}, log_times=(60,))
    fake_run(runs / 'compiled', {'seed': 1, 'compile': True, 'lr': 1e-3}, {'acc': 0.8}, log_times=(60,))
    fake_run(runs / 'other', {'seed': 0, 'compile': True, 'lr': 2e-3}, {'acc': 0.9}, log_times=(60,))
    df = results_table.table(results_table.collect([runs])).set_index('setup')
    assert df.loc['lr=0.001', 'seeds'] == '1 0' and df.loc['lr=0.001', 'acc_mean'] == pytest.approx(0.75)
    assert len(df) == 2 and not any('compile' in setup for setup in df.index)


def test_seeds_the_probe_ran_in_other_memory_layouts_form_one_setup_bf16_and_fp32_do_not(tmp_path):
    runs = tmp_path / 'runs'  # the probe's choice can change between the seeds of one sweep on one machine
    fake_run(runs / 'a', {'seed': 0, 'use_amp': True, 'channels_last': True, 'depthwise_fp32': True}, {'acc': 0.8})
    fake_run(runs / 'b', {'seed': 1, 'use_amp': True, 'channels_last': False, 'depthwise_fp32': False}, {'acc': 0.7})
    fake_run(runs / 'c', {'seed': 0, 'use_amp': False, 'channels_last': True, 'depthwise_fp32': False}, {'acc': 0.6})
    df = results_table.table(results_table.collect([runs])).set_index('setup')
    assert len(df) == 2 and not any('channels_last' in s or 'depthwise' in s for s in df.index)
    bf16 = df.loc['use_amp=True']
    assert bf16['seeds'] == '0 1' and bf16['runs'] == 2 and bf16['acc_mean'] == pytest.approx(0.75)
    assert df.loc['use_amp=False', 'acc_mean'] == pytest.approx(0.6)


def test_real_ensemble_row_equals_prediction_of_the_averaged_checkpoints(elpv_small, tmp_path):
    import main as train_main
    sweep_dir = tmp_path / 'sweep'
    fp32 = '--split_seed 0 --use_amp False --channels_last False'  # the same precision as --pred below
    sweeps.main(['--sweep_dir', str(sweep_dir), '--base', f'--data_path {elpv_small} {TINY} {fp32}',
                 '--grid', 'seed=0,1,2'])
    runs = [sweep_dir / 'runs' / f'seed-{s}' for s in (0, 1, 2)]
    for run in runs:  # the test predictions main.py saves give back its test metrics
        table = pd.read_csv(run / 'test_predictions.csv')
        assert {'path', 'label', 'defect_prob', 'type', 'p_neg', 'p_pos', 'p_defect'} <= set(table.columns)
        again = results_table.ensemble_metrics([{'dir': run, 'args': {'weights': 'best'}}])
        metrics = json.loads((run / 'metrics.json').read_text())
        assert again['auroc'] == pytest.approx(metrics['auroc']) and again['ece'] == pytest.approx(metrics['ece'])
    df = results_table.main(['--runs', str(sweep_dir / 'runs'), '--ensemble', '2', '--out', str(tmp_path / 't')])
    assert df['setup'].tolist() == ['all', 'all: ensemble of 2'] and df.loc[1, 'seeds'] == '0+1'
    assert df.loc[1, 'runs'] == 1 and df.loc[1, 'minutes'] == pytest.approx(2 * df.loc[0, 'minutes'])
    report = tmp_path / 'report'
    train_main.main(['--pred', 'True', '--several_models', 'True', '--resume',
                     *(str(r / 'checkpoint-best.pth') for r in runs[:2]), '--eval_data_path', str(elpv_small),
                     '--test_val_ratio', '0.25', '0.25', '--split_seed', '0', '--pred_save_path', str(report),
                     '--num_workers', '0', '--use_amp', 'False', '--channels_last', 'False'])
    averaged = json.loads((report / 'metrics.json').read_text())
    for m in ('acc', 'auroc', 'ece', 'brier'):
        assert df.loc[1, f'{m}_mean'] == pytest.approx(averaged[m], abs=1e-4), m


def test_ensembles_group_seeds_in_order_and_bad_input(tmp_path, capsys):
    runs = tmp_path / 'runs'
    paths = [f'/data/{k}.png' for k in range(4)]
    labels = ['neg', 'pos', 'neg', 'pos']
    p_pos = {0: [0.2, 0.4, 0.6, 0.8], 1: [0.6, 0.3, 0.1, 0.9], 2: [0.5, 0.5, 0.5, 0.5], 3: [0.9, 0.1, 0.9, 0.1]}
    for seed in (3, 0, 2, 1, 4):  # folder order is not seed order
        fake_run(runs / f's{seed}', {'seed': seed}, {'acc': 0.5}, log_times=(60,))
        if seed in p_pos:
            pd.DataFrame({'path': paths, 'label': labels, 'p_neg': [1 - p for p in p_pos[seed]],
                          'p_pos': p_pos[seed]}).to_csv(runs / f's{seed}' / 'test_predictions.csv', index=False)
    with pytest.raises(DataError, match='s4/test_predictions.csv: missing'):
        results_table.main(['--runs', str(runs), '--ensemble', '5', '--out', str(tmp_path / 't.csv')])
    (runs / 's4' / 'metrics.json').unlink()
    df = results_table.main(['--runs', str(runs), '--ensemble', '2', '--out', str(tmp_path / 't.csv')])
    assert df.loc[1, 'setup'] == 'all: ensemble of 2' and df.loc[1, 'seeds'] == '0+1 2+3'
    # seeds 0+1 average to [0.4, 0.35, 0.35, 0.85]: accuracy 3/4; seeds 2+3 to [0.7, 0.3, 0.7, 0.3]: 0/4 right
    assert df.loc[1, 'acc_mean'] == pytest.approx(0.375) and df.loc[1, 'acc_std'] == pytest.approx(0.75 / 2 ** 0.5)
    assert df.loc[1, 'auroc_mean'] == pytest.approx((0.625 + 0.0) / 2)  # 0.625: one tie, one lost pair of four
    df = results_table.main(['--runs', str(runs), '--ensemble', '3', '--out', str(tmp_path / 't.csv')])
    assert df.loc[1, 'seeds'] == '0+1+2' and 'run(s) left out' in capsys.readouterr().out
    table = pd.read_csv(runs / 's2' / 'test_predictions.csv')
    table.loc[0, 'path'] = '/data/other.png'
    table.to_csv(runs / 's2' / 'test_predictions.csv', index=False)
    with pytest.raises(DataError, match='s2/test_predictions.csv: other images'):
        results_table.main(['--runs', str(runs), '--ensemble', '4', '--out', str(tmp_path / 't.csv')])
    with pytest.raises(DataError, match='--ensemble must be 0'):
        results_table.main(['--runs', str(runs), '--ensemble', '1'])


def test_pairs_average_each_run_with_the_partner_of_its_seed(tmp_path, capsys):
    paths, labels = [f'/data/{k}.png' for k in range(4)], ['neg', 'pos', 'neg', 'pos']

    def run_with(folder, args, p_pos, minutes=1):
        fake_run(folder, args, {'acc': 0.5}, log_times=(60 * minutes,))
        classes = {'p_neg': [1 - p for p in p_pos], 'p_pos': p_pos} if args.get('nb_classes', 2) == 2 else \
            {'p_neg': [1 - p for p in p_pos], 'p_amb_neg': 0, 'p_amb_pos': 0, 'p_pos': p_pos}
        pd.DataFrame({'path': paths, 'label': labels, **classes}).to_csv(folder / 'test_predictions.csv', index=False)

    runs, partner = tmp_path / 'recipe', tmp_path / 'v2'
    run_with(runs / 'a1', {'seed': 1, 'lr': 1e-3}, [0.6, 0.3, 0.1, 0.9])
    run_with(runs / 'a0', {'seed': 0, 'lr': 1e-3}, [0.2, 0.4, 0.6, 0.8])
    run_with(runs / 'a2', {'seed': 2, 'lr': 1e-3}, [0.5, 0.5, 0.5, 0.5])  # no partner of seed 2: not paired
    run_with(runs / 'four', {'seed': 0, 'lr': 1e-3, 'nb_classes': 4}, [0.2, 0.4, 0.6, 0.8])
    run_with(partner / 'b0', {'seed': 0, 'model': 'convnextv2_atto'}, [0.0, 0.8, 0.2, 0.6], minutes=3)
    run_with(partner / 'b1', {'seed': 1, 'model': 'convnextv2_atto'}, [0.2, 0.9, 0.3, 0.7], minutes=3)
    df = results_table.main(['--runs', str(runs), '--pair_with', str(partner), '--out', str(tmp_path / 't.csv')])
    assert df['setup'].tolist() == ['nb_classes=2', f'nb_classes=2: paired with {partner}', 'nb_classes=4']
    pair = df.iloc[1]
    # seed 0: [0.1, 0.6, 0.4, 0.7] -> all four right; seed 1: [0.4, 0.6, 0.2, 0.8] -> all four right
    assert pair['seeds'] == '0+0 1+1' and pair['runs'] == 2 and pair['acc_mean'] == pytest.approx(1.0)
    assert pair['minutes'] == pytest.approx(4.0) and df.iloc[0]['runs'] == 3
    assert 'nb_classes=4: no pairs (another nb_classes than the runs of --pair_with)' in capsys.readouterr().out
    (runs / 'four').rename(tmp_path / 'four')  # one set-up left: --name takes the place of 'all'
    named = results_table.main(['--runs', str(runs), '--pair_with', str(partner), '--name', 'recipe',
                                '--out', str(tmp_path / 't.csv')])
    assert named['setup'].tolist() == ['recipe', f'recipe: paired with {partner}']
    # the same test fraction, another validation fraction: the same test split (carved first), so still pairs
    def set_ratio(folders, ratio):
        for folder in folders:
            args = json.loads((folder / 'args.json').read_text())
            args['test_val_ratio'] = ratio
            (folder / 'args.json').write_text(json.dumps({k: v for k, v in args.items() if v is not None}))

    set_ratio([runs / 'a0', runs / 'a1', runs / 'a2'], [0.25, 0.0])
    set_ratio([partner / 'b0', partner / 'b1'], [0.25, 0.1])
    whole = results_table.main(['--runs', str(runs), '--pair_with', str(partner), '--out', str(tmp_path / 't.csv')])
    assert whole.iloc[1]['seeds'] == '0+0 1+1' and whole.iloc[1]['acc_mean'] == pytest.approx(1.0)
    set_ratio([partner / 'b0', partner / 'b1'], [0.2, 0.1])  # another test fraction: another test split
    assert len(results_table.main(['--runs', str(runs), '--pair_with', str(partner),
                                   '--out', str(tmp_path / 't.csv')])) == 1
    assert 'no pairs (another test_ratio than the runs of --pair_with)' in capsys.readouterr().out
    set_ratio([partner / 'b0', partner / 'b1'], None)  # as before: no split flags
    run_with(partner / 'b0_again', {'seed': 0, 'model': 'convnextv2_atto'}, [0.0, 0.8, 0.2, 0.6])
    with pytest.raises(DataError, match='two runs of one seed'):
        results_table.main(['--runs', str(runs), '--pair_with', str(partner), '--out', str(tmp_path / 't.csv')])
    run_with(partner / 'b2', {'seed': 2, 'model': 'convnextv2_femto'}, [0.0, 0.8, 0.2, 0.6])
    with pytest.raises(DataError, match='needs the runs of one set-up'):
        results_table.main(['--runs', str(runs), '--pair_with', str(partner), '--out', str(tmp_path / 't.csv')])
