"""End to end on a few real ELPV images: training, resume, evaluation, prediction mode, bad input."""
import json
import shutil

import pandas as pd
import pytest
import torch

import budget
import main as cli
from conftest import assert_same_epochs, stopped_at, train_argv
from utils import DataError


def run(argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope='module')
def trained(elpv_small, tmp_path_factory):
    """A 2-epoch training of convnext_atto, 4-class soft head, on 40 real ELPV cells."""
    out = tmp_path_factory.mktemp('run') / 'out'
    summary = run(train_argv(elpv_small, out, '--nb_classes', '4', '--use_softlabel', 'True'))
    return out, summary


def test_training_writes_outputs(trained):
    out, summary = trained
    for name in ('args.json', 'checkpoint-last.pth', 'checkpoint-best.pth', 'log.txt', 'metrics.json',
                 'finished.json'):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    for key in ('train_loss', 'lr', 'val_acc', 'val_auroc', 'val_ap', 'val_f1', 'val_ece', 'val_brier', 'val_acc4',
                'val_acc_amb_pos', 'val_acc4_neg', 'val_mono/auroc', 'val_poly/ece'):
        assert key in records[-1], key
    events = list((out / 'tensorboard').glob('events.out.tfevents.*'))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / 'tensorboard'))
    acc.Reload()
    assert {'train/loss', 'train/lr', 'val/auroc', 'val/ece'} <= set(acc.Tags()['scalars'])
    assert len(acc.Scalars('val/auroc')) == 2
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and {'optimizer', 'lr_scheduler', 'rng', 'args'} <= set(ckpt)
    saved = json.loads((out / 'args.json').read_text())  # --use_amp/--channels_last auto: what the run used
    assert all(isinstance(saved[k], bool) for k in ('use_amp', 'channels_last', 'depthwise_fp32'))
    assert ckpt['args']['use_amp'] == saved['use_amp']
    assert summary['test']['n'] == 10 and 0 <= summary['test']['auroc'] <= 1


def test_refuses_existing_run(trained, elpv_small):
    out, _ = trained
    before = (out / 'log.txt').read_text()
    with pytest.raises(DataError, match='already holds a run'):
        run(train_argv(elpv_small, out))
    assert (out / 'log.txt').read_text() == before


# with a loader worker, augmentation draws from the worker's RNG; two epochs suffice to see the resumed one
@pytest.mark.parametrize('workers,epochs', [('0', '3'), ('1', '2')])
def test_resume_continues_with_same_metrics(elpv_small, tmp_path, monkeypatch, workers, epochs):
    full, cut = tmp_path / 'full', tmp_path / 'cut'

    def argv(out, *extra):
        return train_argv(elpv_small, out, '--epochs', epochs, '--num_workers', workers, *extra)

    run(argv(full))
    monkeypatch.setattr(cli, 'train_one_epoch', stopped_at(cli.train_one_epoch, 1, 5))  # as epoch 2 starts
    with pytest.raises(KeyboardInterrupt):
        run(argv(cut))
    monkeypatch.undo()
    assert len((cut / 'log.txt').read_text().splitlines()) == 1 and not (cut / 'finished.json').exists()
    run(argv(cut, '--auto_resume', 'True'))
    resumed = [json.loads(x) for x in (cut / 'log.txt').read_text().splitlines()]
    straight = [json.loads(x) for x in (full / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in resumed] == list(range(int(epochs)))
    assert_same_epochs(resumed, straight, ['train_loss'], ['val_auroc', 'val_ece'])
    # a finished run is left alone by --auto_resume
    mtime = (cut / 'checkpoint-last.pth').stat().st_mtime_ns
    run(argv(cut, '--auto_resume', 'True'))
    assert (cut / 'checkpoint-last.pth').stat().st_mtime_ns == mtime


def test_killed_before_first_checkpoint_starts_again(elpv_small, tmp_path, monkeypatch):
    """Killed between epoch 1's log line and its first checkpoint, the run starts again with one line per epoch."""
    out = tmp_path / 'o'

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, 'save_checkpoint', killed)
    with pytest.raises(KeyboardInterrupt):
        run(train_argv(elpv_small, out, '--test', 'False'))
    monkeypatch.undo()
    assert len((out / 'log.txt').read_text().splitlines()) == 1 and not (out / 'checkpoint-last.pth').exists()
    run(train_argv(elpv_small, out, '--test', 'False', '--auto_resume', 'True'))
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0, 1]


def test_eval_mode(trained, elpv_small, tmp_path):
    out, summary = trained
    metrics = run(['--eval', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
                   '--output_dir', tmp_path, '--num_workers', '0'])
    assert metrics['auroc'] == pytest.approx(summary['test']['auroc'], abs=1e-6)
    assert json.loads((tmp_path / 'metrics.json').read_text())['n'] == 10


def test_prediction_mode(trained, elpv_small, tmp_path):
    out, _ = trained
    pred = tmp_path / 'pred'
    run(['--pred', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
         '--pred_save_path', pred, '--pred_save', 'True', '--pred_save_with_conf', 'True', '--pred_eval', 'True',
         '--pred_eval_name', 'elpv', '--num_workers', '0', '--conf', '0.4'])
    table = pd.read_csv(pred / 'predictions.csv')
    assert len(table) == 10
    assert {'path', 'label', 'p_amb_neg', 'p_amb_pos', 'p_neg', 'p_pos', 'p_defect', 'pred', 'pred4',
            'correct'} <= set(table.columns)
    assert table['p_defect'].to_numpy() == pytest.approx((table['p_pos'] + table['p_amb_pos']).to_numpy())
    assert ((table['p_defect'] >= 0.4) == (table['pred'] == 'pos')).all()
    copies = sorted((pred / 'images').rglob('*.png'))
    assert len(copies) == 10
    for row in table.itertuples():
        name = f'{row.p_defect:.3f}_{row.path.split("/")[-1]}'
        assert (pred / 'images' / row.label / row.pred / name).is_file()
    graphs = {p.name for p in (pred / 'graphs').iterdir()}
    assert {'elpv_confusion_matrix.png', 'elpv_confusion_matrix4.png', 'elpv_roc.png', 'elpv_precision_recall.png',
            'elpv_histogram.png', 'elpv_reliability.png', 'elpv_threshold.png'} <= graphs


def test_prediction_unlabelled_folder_and_ensemble(trained, elpv_small, tmp_path):
    out, _ = trained
    plain = tmp_path / 'plain'
    plain.mkdir()
    for p in list((elpv_small / 'pos').iterdir())[:3] + list((elpv_small / 'neg').iterdir())[:2]:
        shutil.copy(p, plain / p.name)
    pred = tmp_path / 'pred'
    run(['--pred', 'True', '--resume', out / 'checkpoint-best.pth', out / 'checkpoint-last.pth',
         '--several_models', 'True', '--eval_data_path', plain, '--pred_save_path', pred, '--pred_save', 'True',
         '--num_workers', '0'])
    table = pd.read_csv(pred / 'predictions.csv')
    assert len(table) == 5 and 'label' not in table.columns
    assert sum(len(list((pred / 'images' / c).glob('*.png'))) for c in ('neg', 'pos')
               if (pred / 'images' / c).is_dir()) == 5


@pytest.mark.parametrize('flags,match', [
    (['--soft_label_ratio', '1.5'], 'soft_label_ratio must lie in'),
    (['--label_ratio', '-1'], 'label_ratio must lie in'),
    (['--data_path', '/nonexistent/data'], '/nonexistent/data: data path does not exist'),
    (['--model_ema_eval', 'True'], 'model_ema_eval True needs --model_ema True'),
    (['--model_ema', 'True', '--model_ema_decay', '1'], 'model_ema_decay must lie in'),
    (['--best_metric', 'val_auroc'], "best_metric: 'val_auroc' is not a metric"),
    (['--time_budget', '0'], 'time_budget must be > 0 minutes, got 0'),
])
def test_bad_input_one_line(flags, match, tmp_path, elpv_small):
    argv = train_argv(elpv_small, tmp_path / 'o')
    for i in range(0, len(flags), 2):
        if flags[i] in argv:
            argv[argv.index(flags[i]) + 1] = flags[i + 1]
        else:
            argv += flags[i:i + 2]
    with pytest.raises(DataError, match=match):
        run(argv)
    assert not (tmp_path / 'o').exists()


def test_resume_checkpoint_of_other_architecture(trained, elpv_small, tmp_path):
    out, _ = trained
    with pytest.raises(DataError, match='checkpoint-last.pth: checkpoint does not fit'):
        run(train_argv(elpv_small, tmp_path / 'o', '--model', 'convnext_femto', '--resume',
                       out / 'checkpoint-last.pth'))


def test_prediction_refuses_existing_report(trained, elpv_small, tmp_path):
    out, _ = trained
    argv = ['--pred', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
            '--pred_save_path', tmp_path / 'p', '--num_workers', '0']
    run(argv)
    before = (tmp_path / 'p' / 'predictions.csv').read_text()
    with pytest.raises(DataError, match='already holds a prediction report'):
        run(argv)
    assert (tmp_path / 'p' / 'predictions.csv').read_text() == before


def test_corrupt_training_image_skipped_and_counted(elpv_small, tmp_path, capfd):
    root = tmp_path / 'data'
    shutil.copytree(elpv_small, root)
    listed = pd.read_csv(root / 'list.csv')
    bad = [p for p in listed['path'] if p.startswith('pos/')][:2]
    for p in bad:
        (root / p).write_bytes(b'\x89PNG broken')
    summary = run(train_argv(root, tmp_path / 'o', '--epochs', '1', '--test', 'False',
                             '--test_val_ratio', '0', '0'))
    assert summary['skipped_images'] == 2
    assert json.loads((tmp_path / 'o' / 'finished.json').read_text())['skipped_images'] == 2
    assert 'val (no split) | kept: last epoch' in capfd.readouterr().out  # no validation split: the epoch line says so


def test_split_seed_separate_from_training_seed(elpv_small, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(elpv_small, root, ignore=shutil.ignore_patterns('splits'))
    run(train_argv(root, tmp_path / 'o', '--epochs', '1', '--seed', '5', '--split_seed', '0', '--test', 'False'))
    assert [p.name for p in (root / 'splits').iterdir()] == ['test0.25_val0.25_seed0']
    saved = json.loads((tmp_path / 'o' / 'args.json').read_text())
    assert saved['seed'] == 5 and saved['split_seed'] == 0


@pytest.mark.parametrize('nb_classes', [2, 4])
def test_pos_neg_only_data(elpv_small, tmp_path, nb_classes):
    root = tmp_path / 'data'
    for label in ('neg', 'pos'):
        shutil.copytree(elpv_small / label, root / label)  # class folders only, no list.csv
    summary = run(train_argv(root, tmp_path / 'o', '--epochs', '1', '--nb_classes', nb_classes,
                             '--use_softlabel', 'True'))
    assert summary['test']['n'] == 5 and 'acc_amb_pos' not in summary['test']
    run(['--pred', 'True', '--resume', tmp_path / 'o' / 'checkpoint-best.pth', '--eval_data_path', root,
         '--pred_save_path', tmp_path / 'p', '--pred_eval', 'True', '--num_workers', '0'])
    table = pd.read_csv(tmp_path / 'p' / 'predictions.csv')
    assert set(table['label']) == {'neg', 'pos'} and (tmp_path / 'p' / 'graphs' / 'roc.png').is_file()


def test_label_list_maps_user_folders(elpv_small, tmp_path):
    root = tmp_path / 'raw'
    for label, folder in (('pos', 'crack'), ('neg', 'ok')):
        shutil.copytree(elpv_small / label, root / folder)  # a raw root with the user's own folder names
    with pytest.raises(DataError, match='unknown class folder'):
        run(train_argv(root, tmp_path / 'no_map', '--epochs', '1'))
    with pytest.raises(DataError, match='label must be one of'):
        run(train_argv(root, tmp_path / 'bad_map', '--epochs', '1', '--label_list', 'crack=broken', 'ok=neg'))
    summary = run(train_argv(root, tmp_path / 'o', '--epochs', '1', '--label_list', 'crack=pos', 'ok=neg'))
    split = next((root / 'splits').iterdir())
    train = pd.read_csv(split / 'train.csv')
    assert set(train['label']) == {'neg', 'pos'}
    assert train[train['label'] == 'pos']['path'].str.startswith('crack/').all()
    assert summary['test']['n'] == 5
    # prediction on the raw root maps the folders with the mapping saved in the checkpoint
    run(['--pred', 'True', '--resume', tmp_path / 'o' / 'checkpoint-best.pth', '--eval_data_path', root,
         '--eval_split', 'all', '--pred_save_path', tmp_path / 'p', '--num_workers', '0'])
    table = pd.read_csv(tmp_path / 'p' / 'predictions.csv')
    assert len(table) == 20 and set(table['label']) == {'neg', 'pos'}
    assert (table[table['path'].str.contains('/crack/')]['label'] == 'pos').all()


def test_diverged_loss_is_one_line_and_keeps_the_last_good_epoch(elpv_small, tmp_path, monkeypatch):
    from utils import TrainingDiverged
    real = cli.train_one_epoch

    def poisoned(model, *args, **kwargs):  # the weights blow up during the second epoch
        if args[4] == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float('nan'))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cli, 'train_one_epoch', poisoned)
    out = tmp_path / 'o'
    with pytest.raises(TrainingDiverged, match=r'loss is nan at epoch 1, step 0 \(learning rate .*\); lower --lr'):
        run(train_argv(elpv_small, out, '--epochs', '3'))
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 0
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0]


def test_huge_learning_rate_ends_with_one_line(elpv_small, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), *map(str, train_argv(
        elpv_small, tmp_path / 'o', '--lr', '1e6', '--epochs', '1', '--use_amp', 'False'))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('error: loss is ')


def test_sigterm_stops_cleanly_and_resumes(elpv_small, tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / 'o'
    argv = [sys.executable, str(ROOT / 'main.py'), *map(str, train_argv(elpv_small, out, '--epochs', '3'))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the first epoch is done: SIGTERM as a scheduler sends it before preemption
        if line.startswith('epoch 1/3'):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and 'continue with --auto_resume True' in err and 'Traceback' not in err
    assert not (out / 'finished.json').exists() and not list(out.glob('.*.tmp'))
    done = torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch']
    run(train_argv(elpv_small, out, '--epochs', '3', '--auto_resume', 'True'))
    epochs = [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()]
    assert epochs == [0, 1, 2] and done in (0, 1)


def test_full_disk_keeps_the_previous_checkpoint(elpv_small, tmp_path, monkeypatch):
    import errno
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('epoch') == 1:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', full_disk)
    out = tmp_path / 'o'
    with pytest.raises(DataError, match=r'checkpoint-.*\.pth: cannot write \(No space left on device\); the previous'):
        run(train_argv(elpv_small, out, '--epochs', '3'))
    monkeypatch.undo()
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith('.tmp')]


def test_truncated_last_checkpoint_falls_back_to_best(elpv_small, tmp_path, capfd):
    out = tmp_path / 'o'
    run(train_argv(elpv_small, out, '--epochs', '2', '--test', 'False'))
    (out / 'finished.json').unlink()
    data = (out / 'checkpoint-last.pth').read_bytes()
    (out / 'checkpoint-last.pth').write_bytes(data[:len(data) // 3])  # cut short
    capfd.readouterr()
    run(train_argv(elpv_small, out, '--epochs', '3', '--test', 'False', '--auto_resume', 'True'))
    assert 'checkpoint-last.pth is unreadable; continuing from' in capfd.readouterr().err
    assert [json.loads(x)['epoch'] for x in (out / 'log.txt').read_text().splitlines()] == [0, 1, 2]
    (out / 'finished.json').unlink()
    for name in ('checkpoint-last.pth', 'checkpoint-best.pth'):
        (out / name).write_bytes(b'truncated')
    (out / 'checkpoint-best.pth').unlink()
    with pytest.raises(DataError, match='checkpoint-last.pth: unreadable checkpoint .*; remove it to start'):
        run(train_argv(elpv_small, out, '--epochs', '4', '--auto_resume', 'True'))


def test_batchnorm_model_trains_and_evaluates_from_its_checkpoint(elpv_small, tmp_path):
    out = tmp_path / 'bn'
    fp32 = ['--use_amp', 'False', '--channels_last', 'False']  # one precision: the probe may pick bf16 for --eval
    summary = run(train_argv(elpv_small, out, '--epochs', '1', '--norm_layer', 'batchnorm', '--global_pool', 'max',
                             '--clahe', '2', '--blackhat', '5', *fp32))
    # --eval without --norm_layer, --global_pool, --clahe, --blackhat rebuilds the model and its input from the
    # checkpoint's flags
    metrics = run(['--eval', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
                   '--output_dir', tmp_path / 'eval', '--num_workers', '0', *fp32])
    for key in ('auroc', 'brier', 'ece'):
        assert metrics[key] == pytest.approx(summary['test'][key], abs=1e-6)
    for flag in ('--clahe', '--blackhat'):  # the flags do change the figures
        plain = run(['--eval', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
                     '--output_dir', tmp_path / f'eval{flag}', '--num_workers', '0', flag, '0', *fp32])
        assert plain['brier'] != pytest.approx(summary['test']['brier'], abs=1e-6)
    with pytest.raises(DataError, match='not for FCMAE pretraining'):
        run(train_argv(elpv_small, tmp_path / 'fcmae', '--pretrain', 'True', '--model', 'convnextv2_atto',
                       '--norm_layer', 'batchnorm'))


def test_best_ema_weights_are_kept_and_tested(elpv_small, tmp_path):
    out = tmp_path / 'ema'
    summary = run(train_argv(elpv_small, out, '--epochs', '3', '--model_ema', 'True', '--model_ema_decay', '0.5',
                             '--model_ema_eval', 'True'))
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    ema_auroc = [r['val_ema_auroc'] for r in records]
    best = max(range(3), key=lambda i: (ema_auroc[i], -i))  # the first epoch reaching the best value
    assert summary['best_ema_epoch'] == best + 1 and summary['best_ema_value'] == pytest.approx(ema_auroc[best])
    ema_ckpt = torch.load(out / 'checkpoint-best-ema.pth', weights_only=True)
    last = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ema_ckpt['epoch'] == best and last['best_ema_epoch'] == best  # resumable state
    if best == 2:  # the EMA file holds the EMA weights, not the trained ones
        assert all(torch.equal(ema_ckpt['model'][k], last['model_ema'][k]) for k in ema_ckpt['model'])
        assert not all(torch.equal(ema_ckpt['model'][k], last['model'][k]) for k in ema_ckpt['model'])
    assert json.loads((out / 'metrics_ema.json').read_text()) == summary['test_ema']
    metrics = run(['--eval', 'True', '--resume', out / 'checkpoint-best-ema.pth', '--eval_data_path', elpv_small,
                   '--output_dir', tmp_path / 'eval', '--num_workers', '0'])
    assert metrics['auroc'] == pytest.approx(summary['test_ema']['auroc'], abs=1e-6)
    assert metrics['brier'] == pytest.approx(summary['test_ema']['brier'], abs=1e-3)  # bf16 rounding


def test_best_metric_last_keeps_the_last_epoch_and_tests_it(elpv_small, tmp_path):
    out = tmp_path / 'last'
    summary = run(train_argv(elpv_small, out, '--epochs', '3', '--best_metric', 'last', '--model_ema', 'True',
                             '--model_ema_decay', '0.5', '--model_ema_eval', 'True'))
    assert summary['best_epoch'] == 3 and summary['best_ema_epoch'] == 3
    best = torch.load(out / 'checkpoint-best.pth', weights_only=True)
    last = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert best['epoch'] == 2 and all(torch.equal(best['model'][k], last['model'][k]) for k in last['model'])
    ema = torch.load(out / 'checkpoint-best-ema.pth', weights_only=True)
    assert all(torch.equal(ema['model'][k], last['model_ema'][k]) for k in ema['model'])
    # a metric name this run's validation does not give (4-class accuracy of a 2-class head) stops in one line
    with pytest.raises(DataError, match='best_metric acc4: this run.s validation does not give it'):
        run(train_argv(elpv_small, tmp_path / 'acc4', '--epochs', '1', '--best_metric', 'acc4'))


def test_epochs_within_budget_counts_whole_epochs_left():
    # 600 s budget, 100 s so far, 120 s an epoch: 4 more whole epochs after the first
    assert budget.epochs_within_budget(600, 100, 120, 1, 30) == 5
    assert budget.epochs_within_budget(600, 100, 120, 1, 30, reserve_s=30) == 4  # 470 s left: 3 more
    assert budget.epochs_within_budget(600, 100, 120, 1, 3) == 3  # --epochs stays the upper bound
    assert budget.epochs_within_budget(600, 700, 120, 1, 30) == 1  # spent already: the epoch run is the run


def test_time_budget_fixes_then_shortens_or_lengthens_the_length(capsys):
    import time
    built = []
    rebuild = lambda n: built.append(n) or n
    run_budget = budget.TimeBudget(10, 30, started=time.time() - 90)  # 600 s; 90 s spent before epoch 1 ended
    assert run_budget.length == 30
    assert run_budget.end_epoch(1, 100.0, 0.0, 'first', rebuild) == 6  # 1 + 510 // 100
    run_budget.t_start -= 70  # epoch 2 took 70 s: 160 s spent, 85 s an epoch: 7 would fit, but not at 1.1 x 85 s
    assert run_budget.end_epoch(2, 70.0, 0.0, 6, rebuild) == 6
    run_budget.t_start -= 250  # epoch 3 took 250 s: 410 s spent, 140 s an epoch on average: 3 + 1 more fit
    assert run_budget.end_epoch(3, 250.0, 0.0, 6, rebuild) == 4
    run_budget.t_start -= 1  # epoch 4 took 1 s: 411 s spent, 105 s an epoch: 4 + 1 more fit even at 1.1 x 105 s
    assert run_budget.end_epoch(4, 1.0, 0.0, 4, rebuild) == 5
    assert built == [6, 4, 5] and run_budget.length == 5
    printed = capsys.readouterr().out
    assert 'length fixed at 6' in printed and 'shortened from 6 to 4' in printed and 'lengthened from 4 to 5' in printed
    saved = run_budget.state()
    assert saved['epochs'] == 5 and saved['epoch_times'] == [100.0, 70.0, 250.0, 1.0] and saved['spent_s'] > 410
    resumed = budget.TimeBudget(10, 30, saved, 'checkpoint-last.pth')  # a resumed run goes on from there
    assert resumed.length == 5 and resumed.elapsed_s() >= saved['spent_s']
    assert budget.TimeBudget(10, 30, None, 'old.pth').end_epoch(4, 1.0, 0.0, 'kept', None) == 'kept'  # no budget


def test_warm_up_excess_is_what_the_first_steps_took_beyond_the_rest():
    from engine import warm_up_excess
    assert warm_up_excess([9.0, 3.0, 1.5, 1.0, 1.2, 0.8, 1.0]) == pytest.approx(13.5 - 3 * 1.0)
    assert warm_up_excess([0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]) == 0.0  # faster first steps: nothing, never below 0
    assert warm_up_excess([9.0, 1.0, 1.0, 1.0]) == 0.0  # too few steps to tell


@pytest.mark.parametrize('warmup', ['1', '0'])
def test_schedule_fixed_after_first_epoch_follows_the_shorter_run(warmup):
    """The LR schedule built for --epochs 10 and built again for 4 at the end of epoch 1 sets, from then on, the rates
    of a schedule built for 4 epochs from the start; with a warm-up epoch the first epoch's rates were the same too."""
    from engine import build_lr_scheduler, build_optimizer
    args = cli.get_args_parser().parse_args(['--epochs', '10', '--warmup_epochs', warmup, '--lr', '1e-3'])

    def rates(epochs, rebuild_after=None):  # the rate each of 16 batches (4 epochs of 4) trains with
        optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), argparse_copy(args, epochs=epochs),
                                               updates_per_epoch=4)
        out = [optimizer.param_groups[0]['lr']]
        for update in range(1, 16):
            scheduler.step_update(num_updates=update)
            if update == rebuild_after:
                scheduler = build_lr_scheduler(optimizer, args, 4, 4, updates_done=update)
            out.append(optimizer.param_groups[0]['lr'])
        return out

    direct, rebuilt = rates(4), rates(10, rebuild_after=4)
    assert rebuilt[4:] == pytest.approx(direct[4:], rel=1e-9)
    assert rebuilt[-1] < 0.05 * args.lr  # the cosine ends with the shortened run
    assert (rebuilt[:4] == pytest.approx(direct[:4], rel=1e-9)) == (warmup == '1')


def argparse_copy(args, **changes):
    return type(args)(**{**vars(args), **changes})


def test_time_budget_fixes_the_run_length_and_resume_goes_on_from_it(elpv_small, tmp_path, monkeypatch):
    """--time_budget fixes the epoch count after the first epoch (here 3 of at most 6, what fits stubbed: wall time
    is not reproducible); the schedule ends at --min_lr on the last epoch; a run stopped at epoch 3 and resumed runs
    epoch 3 as the uninterrupted run did, then goes on to 4 when 4 fit; a budget spent by the first epoch ends the
    run there."""
    full, cut, spent = tmp_path / 'full', tmp_path / 'cut', tmp_path / 'spent'

    def argv(out, *extra):
        return train_argv(elpv_small, out, '--epochs', '6', '--warmup_epochs', '1', '--time_budget', '5', *extra)

    asked = []
    monkeypatch.setattr(budget, 'epochs_within_budget', lambda *a, **k: asked.append(a) or 3)
    summary = run(argv(full))
    budget_s, elapsed_s, epoch_s, done, most, _ = asked[0]
    assert (budget_s, done, most) == (300, 1, 6) and elapsed_s > 0 and epoch_s > 0
    assert [a[3] for a in asked] == [1, 2, 3]  # asked after every epoch (it may shorten or lengthen the run)
    straight = [json.loads(x) for x in (full / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in straight] == [0, 1, 2] and summary['epochs_run'] == 3
    assert straight[-1]['lr'] == pytest.approx(1e-6)  # the cosine ends with the shortened run
    assert torch.load(full / 'checkpoint-last.pth', weights_only=True)['time_budget']['epochs'] == 3

    monkeypatch.setattr(cli, 'train_one_epoch', stopped_at(cli.train_one_epoch, 2, 5))  # as epoch 3 starts
    with pytest.raises(KeyboardInterrupt):
        run(argv(cut))
    monkeypatch.undo()
    monkeypatch.setattr(budget, 'epochs_within_budget', lambda *a, **k: 4)  # after epoch 3, one more fits
    summary = run(argv(cut, '--auto_resume', 'True'))
    resumed = [json.loads(x) for x in (cut / 'log.txt').read_text().splitlines()]
    assert_same_epochs(resumed[:3], straight, ['train_loss', 'lr'], ['val_auroc'])  # epoch 3 on the stored length
    assert summary['epochs_run'] == 4 and resumed[-1]['lr'] == pytest.approx(1e-6)  # lengthened past the stored 3
    kept = torch.load(cut / 'checkpoint-last.pth', weights_only=True)['time_budget']
    assert kept['epochs'] == 4 and len(kept['epoch_times']) == 4  # the first process's epochs carried over

    monkeypatch.undo()
    summary = run(argv(spent, '--time_budget', '0.001'))  # 0.06 s: spent before the first epoch ends
    assert summary['epochs_run'] == 1 and len((spent / 'log.txt').read_text().splitlines()) == 1


def test_test_reserve_scales_validation_time_by_split_size_and_tta_views():
    """The time a --time_budget run keeps for its test: validation seconds x test/validation images x TTA views."""
    from types import SimpleNamespace
    data = SimpleNamespace(splits={'val': range(50), 'test': range(200)})

    def reserve(test=True, tta=False, rot90=0.0):
        return cli.test_reserve(SimpleNamespace(test=test, tta=tta, rot90=rot90), data, 10.0)

    assert reserve() == pytest.approx(40.0)
    assert reserve(tta=True) == pytest.approx(160.0)  # the four flips
    assert reserve(tta=True, rot90=0.5) == pytest.approx(320.0)  # the eight symmetries
    assert reserve(test=False, tta=True) == 0.0
    assert cli.test_reserve(SimpleNamespace(test=True, tta=True, rot90=0.0),
                            SimpleNamespace(splits={'test': range(200)}), 10.0) == 0.0


def test_eval_repeats_the_runs_test_with_clahe_on_cached_images(elpv_small, tmp_path):
    """CLAHE runs on the cached images, whose side follows --scale: --eval takes the run's --scale from the
    checkpoint, so it sees the inputs the run's own test saw and gives its figures."""
    out = tmp_path / 'run'
    fp32 = ['--use_amp', 'False', '--channels_last', 'False', '--compile', 'False']  # one precision on both sides
    summary = run(train_argv(elpv_small, out, '--clahe', '2', '--scale', '1.0', '1.0', '--epochs', '1', *fp32))
    metrics = run(['--eval', 'True', '--resume', out / 'checkpoint-best.pth', '--eval_data_path', elpv_small,
                   '--output_dir', tmp_path / 'eval', '--num_workers', '0', *fp32])
    for k in ('auroc', 'brier', 'ece'):
        assert metrics[k] == pytest.approx(summary['test'][k], abs=1e-5), k
