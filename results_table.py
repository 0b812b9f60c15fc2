"""Test metrics of finished runs, mean and spread over seeds, as a CSV file and a markdown table.

    python results_table.py --runs sweeps/elpv_recipe/runs sweeps/elpv_recipe_fcmae/runs --out csv/elpv_table.csv
    python results_table.py --runs sweeps/elpv_long/runs --name "60 min" --previous csv/elpv_6epoch.csv \
        --out csv/elpv_table.csv

Every folder below ``--runs`` with ``args.json`` and ``metrics.json`` (what ``main.py`` writes after its test
evaluation) is one run; one trained with ``--model_ema_eval True`` also gives a row of its best EMA weights
(``metrics_ema.json``, set-up ``weights=best EMA``). The EMA flags do not define the set-up of the row of the best
(trained) weights, which they leave unchanged. A flag that a run's ``args.json`` lacks (saved before the flag existed)
counts as main.py's default value, which is how that run behaved. Runs whose arguments differ only in ``--seed`` (and
in their output folders, or in how each executed: ``--compile``, ``--channels_last`` and ``--depthwise_fp32`` as the
precision probe chose them, ``--depthwise_wgrad``) form one row; the row gives the mean and the sample standard
deviation over its runs of each test metric, and the mean wall time of a run. The wall time is the process time that
``run.py`` recorded in its sweep's ``status.csv`` (the sum of the epoch times in ``log.txt`` when there is none); a
run fine-tuned from an FCMAE encoder (``--finetune`` pointing at the ``encoder.pth`` of a ``--pretrain True`` run)
also counts that pretraining's wall time once per run. ``--previous`` appends the rows of CSV files written before (an
older recipe whose run folders are gone) and ``--name`` labels the new rows, so one table compares recipes.

``--ensemble K`` adds, below each set-up's row, a row of ensembles of K of its runs: the runs, sorted by seed, are
cut into consecutive groups of K (seeds 0-2, 3-5, ... for K = 3; runs left over are not used), each group's test
probabilities (the ``test_predictions.csv`` main.py writes beside ``metrics.json``) are averaged per image (a deep
ensemble, Lakshminarayanan et al., NeurIPS 2017; what ``main.py --pred --several_models True`` does with the
checkpoints) and scored like one run; the row gives the mean and spread over the ensembles and the wall time of K
runs one after another.

``--pair_with RUNS`` adds, below each set-up's row, a row of pairs: each run averaged (as above) with the run of
the same ``--seed`` below ``RUNS``, which hold one set-up of another kind of model (e.g. the FCMAE-initialised
ConvNeXt V2 of ``configs/elpv_ensemble_fcmae.yaml`` beside the BatchNorm runs of ``configs/elpv_ensemble.yaml``);
its wall time is the two runs' (pretraining included). Set-ups with another test split or head than the partner's
(a 4-class head beside a 2-class partner) get no pair row; the validation fraction may differ (the test split is
carved first).
"""
import argparse
import json
import math
from pathlib import Path

import pandas as pd

from utils import DataError, atomic_write_csv, atomic_write_text, read_csv, run_cli

METRICS = ('acc', 'auroc', 'f1', 'ece', 'brier', 'acc4')
# Arguments that differ between the seeds of one set-up without changing it. ``compile``, ``channels_last``,
# ``depthwise_fp32`` and ``depthwise_wgrad`` are how a run executed (left to auto, the probe of precision.py decides
# the first three per machine, model and size, and a later run can time a candidate an earlier one did not), not
# what it computes: the same weights up to rounding. ``use_amp`` (bf16 or fp32 throughout) stays part of the set-up.
PER_RUN = {'seed', 'output_dir', 'log_dir', 'log_name', 'resume', 'auto_resume', 'start_epoch', 'compile',
           'channels_last', 'depthwise_fp32', 'depthwise_wgrad'}
# Arguments of the EMA weights only: the trained weights are the same with or without them (the EMA reads the
# model and draws no random numbers), so they define the set-up of the EMA row, not of the row of the best weights.
EMA_ONLY = {'model_ema', 'model_ema_decay', 'model_ema_eval'}
# What a run and its --pair_with partner must share: the test split and the head. The test split is carved first
# (preprocess_data.make_split), so it depends on the test fraction, not on the validation one: a run trained on the
# whole rest (--test_val_ratio 0.25 0) pairs with one that kept a validation tenth (0.25 0.1).
PAIR_SHARED = ('data_path', 'test_ratio', 'split_seed', 'nb_classes')


def pair_arg(args, key):
    """A run's value of one ``PAIR_SHARED`` key (``test_ratio``: the first of ``test_val_ratio``, None without)."""
    if key == 'test_ratio':
        return (args.get('test_val_ratio') or [None])[0]
    return args.get(key)


def read_json(path):
    """A JSON file as a dict.

    Raises:
        DataError: unreadable or invalid JSON, naming the file.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: unreadable JSON ({e.__class__.__name__}: {e})') from None


def wall_time(run_dir):
    """Seconds one run took: ``run.py``'s status.csv entry, else the sum of ``time_s`` in log.txt, else NaN."""
    run_dir = Path(run_dir)
    status = run_dir.parent.parent / 'status.csv'
    if status.is_file():
        table = read_csv(status, 'sweep status file')
        row = table[(table['name'] == run_dir.name) & (table['exit_code'] == 0)]
        if len(row):
            return float(row['seconds'].iloc[-1])
    return log_seconds(run_dir)


def log_seconds(run_dir):
    """The sum of the epoch times (``time_s``) in a run's log.txt, NaN without one."""
    log = Path(run_dir) / 'log.txt'
    if not log.is_file():
        return math.nan
    return float(sum(json.loads(line).get('time_s', 0.0) for line in log.read_text().splitlines() if line.strip()))


def pretrain_time(finetune):
    """Wall time (s) of the FCMAE run that wrote ``finetune`` (its ``encoder.pth``), 0 for anything else."""
    if not finetune:
        return 0.0
    folder = Path(finetune).parent
    if not Path(finetune).is_file():
        print(f'warning: {finetune}: encoder not found, its pretraining time is not counted')
        return 0.0
    args_path = folder / 'args.json'
    if Path(finetune).name != 'encoder.pth' or not args_path.is_file() or not read_json(args_path).get('pretrain'):
        return 0.0
    return wall_time(folder)


def training_defaults():
    """main.py's default value of every flag (dict flag -> value). Flags are added with the earlier behaviour as
    their default, so a run saved before a flag existed ran as that default does."""
    from flags import get_args_parser as training_parser
    return vars(training_parser().parse_args([]))


def collect(roots):
    """One record per finished run below ``roots``: its arguments, test metrics and wall time.

    Returns:
        list of dicts with ``args`` (dict, plus ``weights``: 'best', or 'best EMA' for the second record of a run
        with ``metrics_ema.json``), ``metrics`` (dict of float), ``seconds`` (float, pretraining included),
        ``dir`` (Path).

    Raises:
        DataError: a root that does not exist, or no finished run below the roots.
    """
    records, defaults = [], training_defaults()
    for root in roots:
        if not Path(root).is_dir():
            raise DataError(f'{root}: no such folder')
        for metrics_path in sorted(Path(root).rglob('metrics.json')):
            run_dir = metrics_path.parent
            if not (run_dir / 'args.json').is_file():
                continue
            args = {**defaults, **read_json(run_dir / 'args.json')}
            seconds = wall_time(run_dir) + pretrain_time(args.get('finetune'))
            trained = {k: v for k, v in args.items() if k not in EMA_ONLY}
            records.append({'args': {**trained, 'weights': 'best'}, 'metrics': read_json(metrics_path),
                            'seconds': seconds, 'dir': run_dir})
            if (run_dir / 'metrics_ema.json').is_file():  # --model_ema_eval: the best EMA weights, tested too
                ema = {**trained, 'weights': 'best EMA', 'model_ema_decay': args.get('model_ema_decay')}
                records.append({'args': ema, 'metrics': read_json(run_dir / 'metrics_ema.json'),
                                'seconds': seconds, 'dir': run_dir})
    if not records:
        raise DataError(f'no finished run (args.json + metrics.json) below {", ".join(map(str, roots))}')
    return records


def setup_key(args):
    """The arguments that define a set-up (everything but seed and output places), as a hashable JSON string."""
    return json.dumps({k: v for k, v in sorted(args.items()) if k not in PER_RUN}, sort_keys=True, default=str)


def shown(value):
    """A flag value in a set-up label: ``none`` for an empty or missing value, else ``str(value)``."""
    return 'none' if value in ('', None) else str(value)


def mean_and_spread(scores):
    """``<metric>_mean`` and ``<metric>_std`` (sample standard deviation, NaN for one value) of each of METRICS
    over a list of metric dicts, for the metrics they hold."""
    out = {}
    for m in METRICS:
        values = pd.Series([s[m] for s in scores if m in s], dtype=float)
        if len(values):
            out[f'{m}_mean'], out[f'{m}_std'] = values.mean(), values.std(ddof=1)
    return out


def table(records, ensemble=0, partners=None):
    """Group runs by set-up and summarise them; with ``ensemble`` >= 2, each set-up's row is followed by the row of
    its ensembles of that many runs (``ensemble_row``), and with ``partners`` (records of one set-up) by the row of
    its seed-matched pairs with them (``pair_row``).

    Returns:
        pandas.DataFrame, one row per set-up in first-seen order: ``setup`` (the arguments that differ between
        set-ups, ``flag=value``, an empty value shown as ``none``, a flag the set-up lacks left out), ``runs``,
        ``seeds``, ``<metric>_mean`` / ``<metric>_std`` for each of METRICS present (sample standard deviation, NaN
        with one run), ``minutes`` (mean wall time per run).
    """
    groups = {}
    for r in records:
        groups.setdefault(setup_key(r['args']), []).append(r)
    keys = [json.loads(k) for k in groups]
    varying = sorted({f for k in keys for f in k if any(k.get(f) != other.get(f) for other in keys)})
    rows = []
    for key, runs in zip(keys, groups.values()):
        row = {'setup': ' '.join(f'{f}={shown(key[f])}' for f in varying if f in key) or 'all',
               'runs': len(runs), 'seeds': ' '.join(str(r['args'].get('seed')) for r in runs)}
        row.update(mean_and_spread([r['metrics'] for r in runs]))
        row['minutes'] = pd.Series([r['seconds'] for r in runs]).mean() / 60
        rows.append(row)
        extra = [ensemble_row(row, runs, ensemble) if ensemble >= 2 else None,
                 pair_row(row, runs, partners) if partners else None]
        rows += [r for r in extra if r]
    return pd.DataFrame(rows)


def predictions_file(record):
    """The test predictions a record's metrics were computed from (``test_predictions[_ema].csv``)."""
    return record['dir'] / ('test_predictions_ema.csv' if record['args']['weights'] == 'best EMA'
                            else 'test_predictions.csv')


def ensemble_metrics(members):
    """Test metrics of the average of several runs' test probabilities.

    Args:
        members: records (``collect``) of one set-up, each with its ``test_predictions.csv``.

    Returns:
        dict of metrics as main.py's metrics.json (``engine.frame_metrics`` at the members' ``--conf``).

    Raises:
        DataError: a missing or unreadable predictions file, or members that predicted different images.
    """
    from engine import frame_metrics  # torch and timm: imported only when ensembles are asked for
    tables = []
    for record in members:
        path = predictions_file(record)
        if not path.is_file():
            raise DataError(f'{path}: missing (runs saved before main.py wrote test predictions cannot be '
                            'ensembled here; use main.py --pred --several_models True)')
        tables.append(read_csv(path, 'test predictions').sort_values('path').reset_index(drop=True))
    columns = [c for c in tables[0].columns if c.startswith('p_') and c != 'p_defect']
    for record, t in zip(members[1:], tables[1:]):
        if list(t['path']) != list(tables[0]['path']) or set(columns) - set(t.columns):
            raise DataError(f'{predictions_file(record)}: other images or classes than '
                            f'{predictions_file(members[0])}; an ensemble needs the same test split and head')
    probs = sum(t[columns].to_numpy(float) for t in tables) / len(tables)
    frame = tables[0][[c for c in ('path', 'label', 'defect_prob', 'type') if c in tables[0].columns]]
    args = members[0]['args']
    return frame_metrics(frame, probs, list(range(len(frame))), args.get('conf', 0.5),
                         args.get('soft_label_ratio', 0.7))


def ensemble_row(row, runs, size):
    """The row of ensembles of ``size`` runs of one set-up (see the module docstring), or None with too few runs."""
    runs = sorted(runs, key=lambda r: (r['args'].get('seed') is None, r['args'].get('seed')))
    groups = [runs[i:i + size] for i in range(0, len(runs) - size + 1, size)]
    if not groups:
        return None
    if len(runs) % size:
        print(f'warning: {row["setup"]}: {len(runs) % size} run(s) left out of the ensembles of {size}')
    scores = [ensemble_metrics(g) for g in groups]
    out = {'setup': f'{row["setup"]}: ensemble of {size}', 'runs': len(groups),
           'seeds': ' '.join('+'.join(str(r['args'].get('seed')) for r in g) for g in groups)}
    out.update(mean_and_spread(scores))
    out['minutes'] = size * row['minutes']
    return out


def check_partners(partners, root):
    """The partner runs of ``--pair_with``, checked to form one set-up with one run per seed.

    Raises:
        DataError: runs of several set-ups, or two runs of one seed, below ``root``.
    """
    if len({setup_key(r['args']) for r in partners}) > 1:
        raise DataError(f'{root}: --pair_with needs the runs of one set-up (seeds only differing); these differ in '
                        'more than the seed')
    seeds = [r['args'].get('seed') for r in partners]
    if len(set(seeds)) < len(seeds):
        raise DataError(f'{root}: --pair_with found two runs of one seed ({sorted(seeds)})')
    return partners


def pair_row(row, runs, partners):
    """The row of a set-up's runs each averaged with the partner run of its seed (module docstring), or None when
    no seed matches or the test split or head differ (``PAIR_SHARED``)."""
    by_seed = {p['args'].get('seed'): p for p in partners}
    pairs = [(r, by_seed[r['args'].get('seed')]) for r in sorted(runs, key=lambda r: r['args'].get('seed'))
             if r['args'].get('seed') in by_seed]
    differ = [k for k in PAIR_SHARED if pair_arg(runs[0]['args'], k) != pair_arg(partners[0]['args'], k)]
    if not pairs or differ:
        if pairs:
            print(f'note: {row["setup"]}: no pairs (another {", ".join(differ)} than the runs of --pair_with)')
        return None
    out = {'setup': f'{row["setup"]}: paired with {partners[0]["dir"].parent}', 'runs': len(pairs),
           'seeds': ' '.join(f'{a["args"].get("seed")}+{b["args"].get("seed")}' for a, b in pairs)}
    out.update(mean_and_spread([ensemble_metrics([a, b]) for a, b in pairs]))
    out['minutes'] = pd.Series([a['seconds'] + b['seconds'] for a, b in pairs]).mean() / 60
    return out


def markdown(df):
    """The table as markdown: ``mean ± std`` per metric (``-`` where a set-up has no such metric)."""
    metrics = [m for m in METRICS if f'{m}_mean' in df]
    lines = ['| setup | runs | ' + ' | '.join(metrics) + ' | minutes per run |',
             '|---|---|' + '---|' * len(metrics) + '---|']
    for _, row in df.iterrows():
        cells = []
        for m in metrics:
            mean, std = row.get(f'{m}_mean'), row.get(f'{m}_std')
            cells.append('-' if pd.isna(mean) else f'{mean:.3f}' + ('' if pd.isna(std) else f' ± {std:.3f}'))
        lines.append(f'| {row["setup"]} | {row["runs"]} | ' + ' | '.join(cells) + f' | {row["minutes"]:.1f} |')
    return '\n'.join(lines) + '\n'


def get_args_parser():
    """The argparse parser of results_table.py's command-line flags."""
    p = argparse.ArgumentParser('Test metrics of finished runs, mean and spread over seeds', add_help=True)
    p.add_argument('--runs', nargs='+', required=True, help='folders holding run folders (e.g. SWEEP/runs)')
    p.add_argument('--out', default='csv/results.csv', help='CSV written here; the markdown beside it (.md)')
    p.add_argument('--name', default='', help='text put before the set-up of each row of these runs')
    p.add_argument('--previous', nargs='*', default=[],
                   help='CSV files this script wrote before (e.g. an older recipe): their rows follow the new ones')
    p.add_argument('--ensemble', type=int, default=0,
                   help='K >= 2: also a row of ensembles of K runs per set-up (their test probabilities averaged)')
    p.add_argument('--pair_with', default='',
                   help='folder of runs of one other set-up: also a row per set-up of each run averaged with the '
                        'run of the same seed there')
    return p


def read_previous(paths):
    """Rows of earlier tables (CSV files ``table`` wrote), for comparison beside new runs.

    Raises:
        DataError: a file that is unreadable, lacks the ``setup``, ``runs`` and ``minutes`` columns, or has a row
            with more fields than its header (e.g. a set-up edited by hand with an unquoted comma).
    """
    frames = []
    for path in paths:
        df = read_csv(path, 'result table')
        if not isinstance(df.index, pd.RangeIndex):  # pandas turns the extra leading fields of such rows into an index
            raise DataError(f'{path}: a row has more fields than the header (a set-up with an unquoted comma?)')
        missing = {'setup', 'runs', 'minutes'} - set(df.columns)
        if missing:
            raise DataError(f'{path}: not a results_table.py CSV (no {", ".join(sorted(missing))} column)')
        frames.append(df)
    return frames


def publish(df, text, out):
    """Write a result table as CSV (``out``) and its markdown ``text`` beside it (``.md``), atomically; print it."""
    atomic_write_csv(df, out)
    atomic_write_text(text, Path(out).with_suffix('.md'))
    print(text, end='')


def main(argv=None):
    """Entry point: print the markdown table and write it with the CSV; returns the DataFrame."""
    args = get_args_parser().parse_args(argv)
    previous = read_previous(args.previous)
    if args.ensemble == 1 or args.ensemble < 0:
        raise DataError(f'--ensemble must be 0 (none) or at least 2 runs, got {args.ensemble}')
    partners = check_partners(collect([args.pair_with]), args.pair_with) if args.pair_with else None
    df = table(collect(args.runs), args.ensemble, partners)
    if args.name:  # 'all' (one set-up) gives way to the name: 'NAME', 'NAME: ensemble of 3'
        rest = df['setup'].str.replace(r'^all(?=$|: )', '', regex=True)
        df['setup'] = args.name + rest.where(rest.eq('') | rest.str.startswith(': '), ': ' + rest)
    df = pd.concat([df, *previous], ignore_index=True)
    metrics = [f'{m}_{s}' for m in METRICS for s in ('mean', 'std') if f'{m}_mean' in df]
    df = df[['setup', 'runs', 'seeds', *metrics, 'minutes']]  # one column order, whichever table had which metric
    publish(df, markdown(df), args.out)
    return df


if __name__ == '__main__':
    run_cli(main)
