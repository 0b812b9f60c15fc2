"""Kill battery: SIGKILL a training, an FCMAE pretraining, a run.py sweep and a prediction report at random moments,
run the same command again, and check that nothing was lost.

    python scripts/kill_battery.py --kills 20 --out /tmp/kill_battery --csv csv/kill_battery.csv

Each kind first runs once uninterrupted (the reference). Then, ``--kills`` times, a fresh copy is started, its whole
process group gets SIGKILL after a random delay (uniform over 95% of the reference's duration, so kills land during
epochs, checkpoint writes, validation, the final test evaluation and report writing; under a noisy load some land
after the end and are counted apart),
and the same command is run again until it finishes. Checked after each kill:

- training and sweep runs: every epoch exactly once in log.txt, the validation metrics of every epoch and the test
  metrics equal to the reference's, finished.json written;
- FCMAE: every epoch once, the same losses, encoder.pth written;
- prediction report: predictions.csv, metrics.json, the graphs and the sorted images equal to the reference's
  (a report killed half-way is written again, never accepted half-written);
- no temporary file of an interrupted atomic write left anywhere.

The data are 40 real ELPV cells of the installed elpv-dataset package (listed, not copied); tiny model and images,
CPU, fp32, no loader workers, so runs are deterministic and comparable. Prints a markdown table (kills per kind,
kills that landed while the process ran, runs with something lost) and exits 1 if anything was lost.
"""
import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from utils import TMP_NAME, DataError, atomic_write_csv, atomic_write_text, run_cli  # noqa: E402

KINDS = ('train', 'fcmae', 'sweep', 'pred')
TOLERANCE = 1e-6


def make_data(folder, per_label=10):
    """A list.csv of ``per_label`` installed ELPV cells per label (absolute paths, both module types)."""
    import elpv_dataset
    src = Path(elpv_dataset.__file__).parent / 'data'
    labels = pd.read_csv(src / 'labels.csv', sep=r'\s+', header=None, names=['path', 'defect_prob', 'type'])
    labels['label'] = [('neg', 'amb_neg', 'amb_pos', 'pos')[int(round(p * 3))] for p in labels['defect_prob']]
    rows = [r for _, g in labels.groupby('label') for r in g.groupby('type').head(per_label // 2).itertuples()]
    table = pd.DataFrame({'path': [str(src / r.path) for r in rows], 'label': [r.label for r in rows],
                          'type': [r.type for r in rows], 'defect_prob': [r.defect_prob for r in rows]})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(table, folder / 'list.csv')
    return folder


def tiny_flags(data, epochs):
    """main.py flags of a small, deterministic CPU run."""
    return ['--data_path', str(data), '--model', 'convnext_atto', '--input_size', '64', '--batch_size', '8',
            '--epochs', str(epochs), '--num_workers', '0', '--test_val_ratio', '0.25', '0.25', '--drop_path', '0',
            '--warmup_epochs', '0', '--use_amp', 'False', '--channels_last', 'False', '--device', 'cpu']


def command(kind, folder, data, epochs, checkpoint=None):
    """The command line of one kind writing into ``folder`` (the same command starts and resumes it)."""
    main_py = str(ROOT / 'main.py')
    if kind == 'train':
        return [sys.executable, main_py, *tiny_flags(data, epochs), '--output_dir', str(folder),
                '--auto_resume', 'True']
    if kind == 'fcmae':
        flags = tiny_flags(data, epochs)
        flags[flags.index('convnext_atto')] = 'convnextv2_atto'
        return [sys.executable, main_py, *flags, '--pretrain', 'True', '--output_dir', str(folder),
                '--auto_resume', 'True']
    if kind == 'sweep':
        return [sys.executable, str(ROOT / 'run.py'), '--sweep_dir', str(folder),
                '--base', shlex.join(tiny_flags(data, epochs)), '--grid', 'seed=0,1']
    return [sys.executable, main_py, '--pred', 'True', '--resume', str(checkpoint), '--eval_data_path', str(data),
            '--eval_split', 'all', '--num_workers', '0', '--device', 'cpu', '--pred_save_path', str(folder),
            '--pred_save', 'True', '--pred_eval', 'True']


def run_to_end(cmd, log):
    """Run a command to its end; returns its exit status."""
    with open(log, 'a') as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def kill_after(cmd, delay, log):
    """Start a command in its own process group and SIGKILL the group after ``delay`` seconds.

    Returns:
        bool, True when the process was still running when it was killed.
    """
    with open(log, 'a') as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True


def read_log(path):
    """log.txt lines as a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def same_numbers(a, b, keys):
    """True when dicts ``a`` and ``b`` agree on every numeric key in ``keys`` (NaN equal to NaN)."""
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if not (abs(x - y) <= TOLERANCE or (x != x and y != y)):
                return False
        elif x != y:
            return False
    return True


def check_run(run, ref, epochs):
    """Problems of one training run folder against the reference run folder (list of str, empty when none)."""
    problems = []
    if not (run / 'finished.json').is_file():
        return ['no finished.json']
    log, ref_log = read_log(run / 'log.txt'), read_log(ref / 'log.txt')
    if [r['epoch'] for r in log] != list(range(epochs)):
        problems.append(f'log.txt epochs {[r["epoch"] for r in log]}')
    for mine, theirs in zip(log, ref_log):
        keys = [k for k in theirs if k.startswith(('val_', 'train_loss'))]
        if not same_numbers(mine, theirs, keys):
            problems.append(f'epoch {theirs["epoch"]}: metrics differ from the reference')
    if (ref / 'metrics.json').is_file():
        m, r = json.loads((run / 'metrics.json').read_text()), json.loads((ref / 'metrics.json').read_text())
        if not same_numbers(m, r, r):
            problems.append('test metrics differ from the reference')
    return problems


def check_fcmae(run, ref, epochs):
    """Problems of an FCMAE pretraining folder against the reference."""
    if not (run / 'encoder.pth').is_file():
        return ['no encoder.pth']
    log, ref_log = read_log(run / 'log.txt'), read_log(ref / 'log.txt')
    problems = [] if [r['epoch'] for r in log] == list(range(epochs)) else [f'log.txt epochs {len(log)}']
    if not all(same_numbers(a, b, ['pretrain_loss']) for a, b in zip(log, ref_log)):
        problems.append('losses differ from the reference')
    return problems


def check_sweep(run, ref, epochs):
    """Problems of a sweep folder against the reference sweep."""
    problems = []
    for name in ('seed-0', 'seed-1'):
        problems += [f'{name}: {p}' for p in check_run(run / 'runs' / name, ref / 'runs' / name, epochs)]
    status = pd.read_csv(run / 'status.csv') if (run / 'status.csv').is_file() else pd.DataFrame()
    if len(status) != 2 or set(status.get('state', [])) != {'finished'}:
        problems.append('status.csv does not record both runs finished')
    return problems


def check_pred(run, ref, epochs):
    """Problems of a prediction report folder against the reference report."""
    if not (run / 'predictions.csv').is_file():
        return ['no predictions.csv']
    mine, theirs = pd.read_csv(run / 'predictions.csv'), pd.read_csv(ref / 'predictions.csv')
    problems = []
    if len(mine) != len(theirs) or (mine['p_defect'] - theirs['p_defect']).abs().max() > TOLERANCE:
        problems.append('predictions.csv differs from the reference')
    for sub in ('images', 'graphs'):
        files = lambda d: sorted(p.relative_to(d).as_posix() for p in (d / sub).rglob('*') if p.is_file())  # noqa
        if files(run) != files(ref):
            problems.append(f'{sub}/ differs from the reference')
    m, r = json.loads((run / 'metrics.json').read_text()), json.loads((ref / 'metrics.json').read_text())
    if not same_numbers(m, r, r):
        problems.append('metrics.json differs from the reference')
    return problems


CHECKS = {'train': check_run, 'fcmae': check_fcmae, 'sweep': check_sweep, 'pred': check_pred}


def battery(kind, out, data, kills, epochs, rng, checkpoint=None):
    """Reference run, then ``kills`` killed-and-resumed runs of one kind; returns (summary row, per-kill rows)."""
    ref = out / kind / 'reference'
    t0 = time.time()
    if run_to_end(command(kind, ref, data, epochs, checkpoint), out / kind / 'reference.log') != 0:
        raise DataError(f'{out / kind / "reference.log"}: the uninterrupted {kind} run failed')
    duration = time.time() - t0
    rows = []
    for i in range(kills):
        folder = out / kind / f'kill{i:02d}'
        cmd = command(kind, folder, data, epochs, checkpoint)
        delay = rng.uniform(0.5, 0.95 * duration)
        landed = kill_after(cmd, delay, out / kind / f'kill{i:02d}.log')
        status = run_to_end(cmd, out / kind / f'kill{i:02d}.log')
        problems = [] if status == 0 or kind == 'pred' else [f'resume exit status {status}']
        problems += CHECKS[kind](folder, ref, epochs)
        stale = [str(p) for p in folder.rglob('.*.tmp') if TMP_NAME.fullmatch(p.name)]
        problems += [f'temporary file left: {p}' for p in stale]
        rows.append({'kind': kind, 'kill': i, 'delay_s': round(delay, 2), 'landed': landed, 'lost': bool(problems),
                     'problems': '; '.join(problems)})
        print(f'{kind} kill {i + 1}/{kills} after {delay:.1f}s ({"while running" if landed else "after the end"}): '
              f'{"LOST: " + "; ".join(problems) if problems else "nothing lost"}', flush=True)
    summary = {'kind': kind, 'kills': kills, 'landed': sum(r['landed'] for r in rows),
               'lost': sum(r['lost'] for r in rows), 'reference_s': round(duration, 1)}
    return summary, rows


def markdown(summary):
    """The summary as a markdown table."""
    lines = ['| kind | kills | landed while running | runs with something lost | uninterrupted run (s) |',
             '|---|---|---|---|---|']
    lines += [f'| {r.kind} | {r.kills} | {r.landed} | {r.lost} | {r.reference_s} |' for r in summary.itertuples()]
    return '\n'.join(lines) + '\n'


def get_args_parser():
    p = argparse.ArgumentParser('Kill battery: SIGKILL at random moments, resume, check nothing was lost')
    p.add_argument('--kills', type=int, default=20, help='kills per kind')
    p.add_argument('--kinds', nargs='+', default=list(KINDS), choices=KINDS)
    p.add_argument('--epochs', type=int, default=3, help='epochs of each training and pretraining')
    p.add_argument('--out', required=True, help='working folder (must not exist)')
    p.add_argument('--csv', default=None, help='also write the summary here (e.g. csv/kill_battery.csv)')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill moments')
    return p


def main(argv=None):
    """Entry point; returns the summary DataFrame. Exits 1 (DataError) when a kill lost something."""
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise DataError(f'{out}: already exists; give a new --out folder')
    data = make_data(out / 'data')
    rng = random.Random(args.seed)
    checkpoint = None
    if 'pred' in args.kinds:  # the report predicts with a trained checkpoint
        trained = out / 'pred_model'
        if run_to_end(command('train', trained, data, args.epochs), out / 'pred_model.log') != 0:
            raise DataError(f'{out / "pred_model.log"}: training the prediction model failed')
        checkpoint = trained / 'checkpoint-best.pth'
    summaries, rows = [], []
    for kind in args.kinds:
        (out / kind).mkdir(parents=True)
        summary, kill_rows = battery(kind, out, data, args.kills, args.epochs, rng, checkpoint)
        summaries.append(summary)
        rows += kill_rows
    summary = pd.DataFrame(summaries)
    atomic_write_csv(pd.DataFrame(rows), out / 'kills.csv')
    text = markdown(summary)
    atomic_write_text(text, out / 'kill_battery.md')
    if args.csv:
        atomic_write_csv(summary, args.csv)
    print(text, end='')
    if summary['lost'].any():
        raise DataError(f'{int(summary["lost"].sum())} kill(s) lost something; see {out / "kills.csv"}')
    return summary


if __name__ == '__main__':
    run_cli(main)
