"""Export the TensorBoard logs of every run below a folder to CSV files (and plots).

    python load_board.py --path output/sweep/tensorboard --out csv/ --metric val/auroc --plot True

Writes ``<out>/<run>.csv`` (one row per step, one column per scalar tag, wall time included) and
``<out>/summary.csv`` (one row per run: its hyper-parameters from ``args.json``, and for each validation metric the
best value, the step of the best and the last value), both atomically. Event files are read with tensorboard's own
record reader; a run with several event files (resumed training) is merged in step order, the value written last winning
for a repeated step.
"""
import argparse
import fnmatch
import json
import logging
import math
import re
from pathlib import Path

import pandas as pd
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors as tf_errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
from tensorboard.util import tensor_util

from metrics import lower_is_better
from utils import DataError, atomic_write_csv, run_cli, str2bool

log = logging.getLogger('load_board')
EVENT_GLOB = 'events.out.tfevents.*'


def find_runs(logdir):
    """Folders below ``logdir`` (itself included) holding TensorBoard event files.

    Returns:
        dict run name (folder path relative to ``logdir``, '/'-separated; '.' for ``logdir`` itself) -> Path.

    Raises:
        DataError: ``logdir`` is missing or holds no event file.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise DataError(f'{logdir}: log folder does not exist')
    folders = sorted({p.parent for p in logdir.rglob(EVENT_GLOB) if p.is_file()})
    if not folders:
        raise DataError(f'{logdir}: no TensorBoard event file ({EVENT_GLOB}) below this folder')
    return {f.relative_to(logdir).as_posix(): f for f in folders}


def read_event_file(path):
    """Scalar events of one event file, read record by record with tensorboard's record reader.

    A truncated or corrupt file gives a warning naming it; the events read before the damage are kept.

    Returns:
        list of (tag, step, wall_time, value) tuples in file order.
    """
    rows = []
    reader = PyRecordReader_New(str(path))
    while True:
        try:
            reader.GetNext()
        except tf_errors.OutOfRangeError:  # clean end of file
            break
        except tf_errors.DataLossError as e:  # truncated record or failed checksum
            log.warning(f'{path}: damaged event file ({e.message}); kept the {len(rows)} values before it')
            break
        try:
            event = event_pb2.Event.FromString(reader.record())
        except DecodeError:
            log.warning(f'{path}: damaged event record; kept the {len(rows)} values before it')
            break
        for v in event.summary.value:
            if v.HasField('simple_value'):
                value = float(v.simple_value)
            elif v.HasField('tensor') and v.metadata.plugin_data.plugin_name == 'scalars':
                value = float(tensor_util.make_ndarray(v.tensor))
            else:
                continue
            rows.append((v.tag, int(event.step), float(event.wall_time), value))
    return rows


def read_run(folder, tags=None):
    """All scalars of a run folder, event files merged in order, one row per (tag, step).

    Args:
        folder: run folder. tags: optional list of tag patterns (fnmatch, e.g. ``val/*``) to keep.

    Returns:
        long DataFrame with columns tag, step, wall_time, value, sorted by tag and step.
    """
    rows = []
    files = sorted(Path(folder).glob(EVENT_GLOB), key=lambda p: (p.stat().st_mtime, p.name))
    for order, path in enumerate(files):
        rows += [(order, *r) for r in read_event_file(path)]
    df = pd.DataFrame(rows, columns=['file', 'tag', 'step', 'wall_time', 'value'])
    if tags:
        df = df[[any(fnmatch.fnmatch(t, p) for p in tags) for t in df['tag']]]
    # a resumed run writes some steps again: the later file (then the later record) wins
    df = df.sort_values(['file', 'wall_time'], kind='stable').drop_duplicates(['tag', 'step'], keep='last')
    return df.drop(columns='file').sort_values(['tag', 'step']).reset_index(drop=True)


def wide_table(long):
    """One row per step, one column per tag (sorted), plus ``wall_time`` (the latest of the step)."""
    if long.empty:
        return pd.DataFrame(columns=['step', 'wall_time'])
    table = long.pivot_table(index='step', columns='tag', values='value', aggfunc='last')
    table = table.reindex(sorted(table.columns), axis=1)
    table.insert(0, 'wall_time', long.groupby('step')['wall_time'].max())
    return table.reset_index().rename_axis(columns=None)


def run_args(folder, logdir):
    """Hyper-parameters of a run: the first ``args.json`` in its folder or up to the log root; {} if none."""
    folder, logdir = Path(folder).resolve(), Path(logdir).resolve()
    for candidate in [folder, *folder.parents]:
        if (candidate / 'args.json').is_file():
            try:
                return json.loads((candidate / 'args.json').read_text())
            except json.JSONDecodeError:
                log.warning(f'{candidate / "args.json"}: not valid JSON; hyper-parameters left out')
                return {}
        if candidate == logdir:
            break
    return {}


def summarise(long, args):
    """Summary row of one run: hyper-parameters (``arg.<name>``) and best/best_step/last of each validation tag."""
    row = {f'arg.{k}': (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in sorted(args.items())}
    for tag, g in long[long['tag'].str.startswith('val/')].groupby('tag', sort=True):
        g = g.sort_values('step')
        values = g['value'].where(g['value'].map(math.isfinite))
        if values.notna().any():
            best = values.idxmin() if lower_is_better(tag) else values.idxmax()
            row[f'{tag}/best'], row[f'{tag}/best_step'] = g.at[best, 'value'], int(g.at[best, 'step'])
        else:
            row[f'{tag}/best'], row[f'{tag}/best_step'] = float('nan'), -1
        row[f'{tag}/last'] = g['value'].iloc[-1]
    return row


def safe_name(run):
    """File-system-safe file stem for a run name ('.' -> 'run')."""
    return 'run' if run == '.' else re.sub(r'[^A-Za-z0-9._=-]+', '__', run)


def export(logdir, out='csv', tags=None, metric='val/auroc', plot=False):
    """Export every run below ``logdir`` to CSV (and plots); returns the summary DataFrame (ranked by ``metric``).

    Raises:
        DataError: ``logdir`` missing or without event files.
    """
    runs = find_runs(logdir)
    out = Path(out)
    rows, curves = [], {}
    for run, folder in runs.items():
        long = read_run(folder, tags)
        atomic_write_csv(wide_table(long), out / f'{safe_name(run)}.csv')
        rows.append({'run': run, **summarise(long, run_args(folder, logdir))})
        curves[run] = long
    summary = pd.DataFrame(rows)
    metric_cols = sorted(c for c in summary.columns if c.startswith('val/'))
    summary = summary[['run'] + sorted(c for c in summary.columns if c.startswith('arg.')) + metric_cols]
    key = f'{metric}/best'
    if key in summary.columns:
        summary = summary.sort_values([key, 'run'], ascending=[lower_is_better(metric), True], na_position='last')
    else:
        log.warning(f'--metric {metric}: no such validation tag; summary sorted by run name')
        summary = summary.sort_values('run')
    summary = summary.reset_index(drop=True)
    atomic_write_csv(summary, out / 'summary.csv')
    if plot:
        draw(curves, summary, out)
    log.info(f'exported {len(runs)} run(s) from {logdir} to {out}')
    return summary


def draw(curves, summary, out):
    """Per validation tag: curves of all runs (``curve_<tag>.png``) and best value per run (``best_<tag>.png``)."""
    from plots import plt, save_figure
    tags = sorted({t for long in curves.values() for t in long['tag'].unique() if t.startswith('val/')})
    for tag in tags:
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, long in curves.items():
            g = long[long['tag'] == tag]
            if len(g):
                ax.plot(g['step'], g['value'], marker='.', label=run)
        ax.set(xlabel='epoch', ylabel=tag, title=tag)
        ax.legend(fontsize=7, loc='best')
        save_figure(fig, out / f'curve_{safe_name(tag)}.png')
        col = f'{tag}/best'
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(summary))))
        ax.barh(summary['run'], summary[col] if col in summary.columns else 0)
        ax.invert_yaxis()
        ax.set(xlabel=f'best {tag}', title=f'best {tag} per run')
        save_figure(fig, out / f'best_{safe_name(tag)}.png')


def get_args_parser():
    """Command-line flags of load_board.py."""
    p = argparse.ArgumentParser('TensorBoard logs to CSV', allow_abbrev=False)
    p.add_argument('--path', required=True, help='folder with the runs\' event files (searched recursively)')
    p.add_argument('--out', default='csv', help='output folder')
    p.add_argument('--tags', nargs='*', default=None, help='tag patterns to keep, e.g. "val/*" train/loss')
    p.add_argument('--metric', default='val/auroc', help='validation tag that ranks the runs')
    p.add_argument('--plot', type=str2bool, default=False, help='draw curves and best-value bar charts')
    p.add_argument('--top', type=int, default=5, help='runs to print')
    return p


def main(argv=None):
    """Entry point; returns the summary DataFrame."""
    args = get_args_parser().parse_args(argv)
    summary = export(args.path, args.out, args.tags, args.metric, args.plot)
    print_top(summary, args.metric, args.top)
    print(f'summary: {Path(args.out) / "summary.csv"}')
    return summary


def print_top(summary, metric, top=5):
    """Print the best ``top`` runs of a summary ranked by ``metric`` (nothing if the metric is absent)."""
    col = f'{metric}/best'
    if col in summary.columns:
        print(f'top runs by {metric}:')
        for run, value in zip(summary['run'].head(top), summary[col].head(top)):
            print(f'  {value:.4f}  {run}')


if __name__ == '__main__':
    run_cli(main)
