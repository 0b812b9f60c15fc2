"""Experiment sweeps over main.py that survive interruption.

    python run.py --config configs/sweep_soft_label_ratio.yaml
    python run.py --sweep_dir sweeps/ratio --base "--data_path data/elpv --epochs 10 --use_softlabel True" \
        --grid soft_label_ratio=0.6,0.7,0.8 nb_classes=2,4
    python run.py --config configs/sweep_models.yaml --dry_run True

Each run gets a name built from the values that vary (``nb_classes-4_soft_label_ratio-0.7``), its own
``--output_dir SWEEP/runs/NAME`` and ``--log_dir SWEEP/tensorboard --log_name NAME``, and its exact command in
``SWEEP/runs/NAME/command.txt``. A finished run (main.py's ``finished.json``) is skipped, an interrupted one resumes
from its last checkpoint (``--auto_resume True``), a failed one is recorded in ``SWEEP/status.csv`` with its exit
code and the tail of its log, and the sweep goes on. At the end the runs are exported with load_board.py into
``SWEEP/csv/`` and the best are printed.
"""
import argparse
import hashlib
import itertools
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from config import check_flag_names, read_yaml_mapping, tokens
from utils import DataError, atomic_write_csv, folder_lock, read_csv, run_cli, str2bool

log = logging.getLogger('run')
HERE = Path(__file__).resolve().parent
MANAGED = ('output_dir', 'log_dir', 'log_name', 'auto_resume')
LAUNCHERS = ('local', 'torchrun', 'slurm')


def parse_base(text):
    """main.py flags from a command-line string, e.g. ``"--data_path a b --epochs 3"`` -> {flag: [tokens]}.

    Raises:
        DataError: a value before any flag.
    """
    flags, current = {}, None
    for tok in shlex.split(text or ''):
        if tok.startswith('--'):
            current, _, inline = tok[2:].partition('=')
            flags[current] = [inline] if inline else []
        elif current is None:
            raise DataError(f'--base "{text}": "{tok}" comes before any flag')
        else:
            flags[current].append(tok)
    return flags


def parse_assignments(items, option):
    """``flag=v1,v2`` command-line items -> {flag: [[tokens of v1], [tokens of v2]]} (a value may hold spaces)."""
    out = {}
    for item in items or []:
        if '=' not in item:
            raise DataError(f'--{option} item "{item}" must look like flag=value1,value2')
        flag, values = item.split('=', 1)
        out[flag.lstrip('-')] = [v.split() for v in values.split(',')]
    return out


def normalise(mapping):
    """YAML values -> {flag: [tokens of each value]} for ``grid``/``zip``; a scalar counts as a one-value list."""
    out = {}
    for flag, values in (mapping or {}).items():
        values = values if isinstance(values, list) else [values]
        out[str(flag).lstrip('-')] = [tokens(v) for v in values]
    return out


def load_sweep(args):
    """The sweep of a YAML file and/or the command line.

    YAML keys: ``sweep_dir``, ``base`` (flags for every run), ``grid`` (every combination), ``zip`` (element-wise,
    crossed with the grid), ``zip_names`` (a run-name part per zip row, in place of its values), ``launcher``,
    ``nproc_per_node``, ``metric``, ``slurm`` (partition, time, gpus_per_node, nodes, cpus_per_task).
    Command-line ``--base``/``--grid``/``--zip`` add to (and override) the file.

    Returns:
        dict with sweep_dir (Path), base ({flag: tokens}), grid and zip ({flag: [tokens, ...]}), launcher options.

    Raises:
        DataError: unreadable YAML, unknown keys, zip lists of unequal length, managed flags in base, no sweep_dir.
    """
    cfg = {}
    if args.config:
        cfg = read_yaml_mapping(args.config, 'sweep file')
        unknown = set(cfg) - {'sweep_dir', 'base', 'grid', 'zip', 'zip_names', 'launcher', 'nproc_per_node', 'metric',
                              'slurm'}
        if unknown:
            raise DataError(f'{args.config}: unknown key(s) {", ".join(sorted(unknown))}')
        for key in ('base', 'grid', 'zip', 'slurm'):
            if not isinstance(cfg.get(key) or {}, dict):
                raise DataError(f'{args.config}: {key} must be a mapping of names to values')
    base = {str(k).lstrip('-'): tokens(v) for k, v in (cfg.get('base') or {}).items()}
    base.update(parse_base(args.base))
    grid = normalise(cfg.get('grid'))
    grid.update(parse_assignments(args.grid, 'grid'))
    zipped = normalise(cfg.get('zip'))
    zipped.update(parse_assignments(args.zip, 'zip'))
    from flags import get_args_parser
    check_flag_names([*base, *grid, *zipped], get_args_parser(), args.config or 'the sweep')
    managed = [f for f in MANAGED if f in base or f in grid or f in zipped]
    if managed:
        raise DataError(f'--{managed[0]} is set by run.py for each run; leave it out of the sweep')
    if len({len(v) for v in zipped.values()}) > 1:
        raise DataError('zip: all lists must have the same length, got ' +
                        ', '.join(f'{k} {len(v)}' for k, v in zipped.items()))
    zip_names = [safe(str(n)) for n in cfg.get('zip_names') or []]
    rows = len(next(iter(zipped.values()))) if zipped else 0
    if zip_names and (len(zip_names) != rows or len(set(zip_names)) != rows):
        raise DataError(f'{args.config}: zip_names needs {rows} different names, one per zip row, '
                        f'got {len(zip_names)}')
    sweep_dir = args.sweep_dir or cfg.get('sweep_dir')
    if not sweep_dir:
        raise DataError('give --sweep_dir (or sweep_dir: in the sweep file)')
    slurm = dict(cfg.get('slurm') or {})
    for key in ('partition', 'time', 'gpus_per_node', 'nodes'):
        if getattr(args, f'slurm_{key}') is not None:
            slurm[key] = getattr(args, f'slurm_{key}')
    return {'sweep_dir': Path(sweep_dir), 'base': base, 'grid': grid, 'zip': zipped, 'zip_names': zip_names,
            'launcher': args.launcher or cfg.get('launcher', 'local'),
            'nproc_per_node': args.nproc_per_node or cfg.get('nproc_per_node', 1),
            'metric': args.metric or cfg.get('metric', 'val/auroc'), 'slurm': slurm}


def safe(text):
    """File-system-safe form of a value: letters, digits and . _ - = kept, anything else becomes '-'."""
    return re.sub(r'[^A-Za-z0-9._=-]+', '-', text).strip('-') or 'x'


def run_name(values):
    """Readable run name from the varying flags, sorted: ``nb_classes-4_soft_label_ratio-0.7``."""
    return '_'.join(f'{flag}-{safe("-".join(toks))}' for flag, toks in sorted(values.items())) or 'run'


def plan_runs(sweep):
    """Every run of a sweep: grid combinations crossed with zip rows, in a stable order.

    Returns:
        list of dicts: name (unique), values ({flag: tokens} that vary), flags ({flag: tokens}, base included).
    """
    grid_flags = sorted(sweep['grid'])
    combos = list(itertools.product(*[sweep['grid'][f] for f in grid_flags])) or [()]
    zip_flags = sorted(sweep['zip'])
    rows = list(zip(*[sweep['zip'][f] for f in zip_flags])) or [()]
    runs, seen = [], {}
    for combo in combos:
        for i, row in enumerate(rows):
            values = dict(zip(grid_flags, combo)) | dict(zip(zip_flags, row))
            name = run_name(values)
            if sweep.get('zip_names'):  # a name per zip row stands for the zip's values
                name = '_'.join([sweep['zip_names'][i], run_name(dict(zip(grid_flags, combo)))][:2 if combo else 1])
            if len(name) > 120:
                name = name[:100] + '_' + hashlib.sha1(name.encode()).hexdigest()[:8]
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f'{name}_{seen[name]}'
            runs.append({'name': name, 'values': values, 'flags': {**sweep['base'], **values}})
    return runs


def run_state(out_dir):
    """'finished' (finished.json), 'interrupted' (a checkpoint without finished.json) or 'new'."""
    out_dir = Path(out_dir)
    if (out_dir / 'finished.json').is_file():
        return 'finished'
    if (out_dir / 'checkpoint-last.pth').is_file():
        return 'interrupted'
    return 'new'


def build_command(run, sweep):
    """The command line of one run (a list of str), with its own output and TensorBoard folders."""
    out = sweep['sweep_dir'] / 'runs' / run['name']
    flags = {**run['flags'], 'output_dir': [str(out)], 'log_dir': [str(sweep['sweep_dir'] / 'tensorboard')],
             'log_name': [run['name']], 'auto_resume': ['True']}
    args = [t for flag, toks in flags.items() for t in (f'--{flag}', *toks)]
    main_py = str(HERE / 'main.py')
    if sweep['launcher'] == 'torchrun':
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                f'--nproc_per_node={sweep["nproc_per_node"]}', main_py, *args]
    return [sys.executable, main_py, *args]


def stop(proc, timeout=120):
    """Send SIGTERM to a running subprocess.Popen and wait for it (SIGKILL after ``timeout`` seconds)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def execute(command, log_path, env=None, on_start=None):
    """Run a command, its output appended to ``log_path``; returns its exit code (used locally and by submitit).

    Ctrl-C or SIGTERM here is passed on to the command as SIGTERM, and waited for (at most 2 minutes), before it
    propagates: a training stops cleanly with its checkpoint, resumable by the next sweep.

    Args:
        command: list of str. log_path: str or Path. env: dict of environment variables (None: this process's).
        on_start: optional callable given the subprocess.Popen once it runs.
    """
    with open(log_path, 'a') as f:
        f.write(f'\n# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(command)}\n')
        f.flush()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=str(HERE), env=env)
        if on_start is not None:
            on_start(proc)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run stops as it would alone, after its last checkpoint
            stop(proc)
            raise


def task_environment(job_env):
    """The torch.distributed variables of one SLURM task, from submitit's ``JobEnvironment``.

    Args:
        job_env: object with ``global_rank``, ``local_rank``, ``num_tasks``, ``num_nodes``, ``hostnames`` (list of
            str, the job's nodes in order) and ``job_id`` (str), as ``submitit.JobEnvironment()`` gives.
    Returns:
        dict of str: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the first node), MASTER_PORT (from
        the job id, the same in every task of the job) -- what ``torch.distributed``'s env:// start reads, as torchrun
        sets it.
    """
    port = 20000 + int(hashlib.sha1(str(job_env.job_id).encode()).hexdigest(), 16) % 20000
    return {'RANK': str(job_env.global_rank), 'WORLD_SIZE': str(job_env.num_tasks),
            'LOCAL_RANK': str(job_env.local_rank), 'LOCAL_WORLD_SIZE': str(job_env.num_tasks // job_env.num_nodes),
            'MASTER_ADDR': str(job_env.hostnames[0]), 'MASTER_PORT': str(port)}


class SlurmTask:
    """What submitit runs in every task of a run's SLURM job (one task per GPU): ``python main.py ...`` with the
    torch.distributed variables of the task (``task_environment``), rank 0's output in the run's train.log and the
    others' in train.rankN.log.

    On preemption or time-out submitit calls ``checkpoint`` in the rank-0 task: the training gets SIGTERM, stops with
    its last epoch's checkpoint, and the same command (which carries ``--auto_resume True``) is requeued.
    """

    def __init__(self):
        self.proc = None

    def __call__(self, command, log_path):
        """Run the command in this task; returns its exit code."""
        import submitit
        job_env = submitit.JobEnvironment()
        env = {**os.environ, **task_environment(job_env)}
        if job_env.global_rank:
            log_path = Path(log_path).with_suffix(f'.rank{job_env.global_rank}.log')
        return execute(command, log_path, env=env, on_start=lambda proc: setattr(self, 'proc', proc))

    def checkpoint(self, command, log_path):
        """Stop the training cleanly and return the submission that requeues it (submitit's checkpoint protocol)."""
        import submitit
        stop(self.proc)
        self.proc = None
        return submitit.helpers.DelayedSubmission(SlurmTask(), command, log_path)


def tail(path, lines=15):
    """The last lines of a text file ('' if missing)."""
    try:
        return '\n'.join(Path(path).read_text(errors='replace').splitlines()[-lines:])
    except OSError:
        return ''


def record(status_path, row):
    """Update one run's row of the sweep's status.csv (written atomically)."""
    table = read_csv(status_path, 'sweep status file') if Path(status_path).is_file() else \
        pd.DataFrame(columns=list(row))
    table = table[table['name'] != row['name']]
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True).sort_values('name')
    atomic_write_csv(table, status_path)


def slurm_executor(sweep, name, cluster=None):
    """A submitit executor for one run (SLURM, or submitit's local executor with ``cluster='local'``).

    One task per GPU on each of ``nodes`` nodes (one task where no GPU is asked for); each task runs SlurmTask.
    """
    import submitit
    s = sweep['slurm']
    executor = submitit.AutoExecutor(folder=str(sweep['sweep_dir'] / 'slurm' / name), cluster=cluster)
    gpus = int(s.get('gpus_per_node') or 0)
    extra = {'cpus_per_task': int(s['cpus_per_task'])} if s.get('cpus_per_task') else {}
    executor.update_parameters(name=name, timeout_min=int(s.get('time', 60)), nodes=int(s.get('nodes', 1)),
                               tasks_per_node=max(gpus, 1), slurm_partition=s.get('partition'),
                               slurm_gpus_per_node=gpus or None, **extra)
    return executor


def run_sweep(sweep, dry_run=False, slurm_cluster=None, top=5):
    """Run (or with ``dry_run`` only print, with each run's command line) every run of a sweep.

    Returns {name: state after the sweep} ('finished', 'interrupted', 'new' or 'failed')."""
    runs = plan_runs(sweep)
    sweep_dir = sweep['sweep_dir']
    states = {r['name']: run_state(sweep_dir / 'runs' / r['name']) for r in runs}
    action = {'finished': 'skip (finished)', 'interrupted': 'resume', 'new': 'run'}
    print(f'sweep {sweep_dir}: {len(runs)} run(s), launcher {sweep["launcher"]}')
    for r in runs:
        print(f'  {action[states[r["name"]]]:16s} {r["name"]}')
        if dry_run:
            print(f'      {shlex.join(build_command(r, sweep))}')
    if dry_run:
        return states
    status_path = sweep_dir / 'status.csv'
    jobs = []
    for i, r in enumerate(runs):
        name, out = r['name'], sweep_dir / 'runs' / r['name']
        if states[name] == 'finished':
            record_unrecorded(status_path, name, out)
            continue
        out.mkdir(parents=True, exist_ok=True)
        command = build_command(r, sweep)
        (out / 'command.txt').write_text(shlex.join(command) + '\n')
        print(f'[{i + 1}/{len(runs)}] {action[states[name]]} {name}', flush=True)
        t0 = time.time()
        if sweep['launcher'] == 'slurm':
            job = slurm_executor(sweep, name, slurm_cluster).submit(SlurmTask(), command, str(out / 'train.log'))
            jobs.append((name, out, job, t0))
            continue
        try:
            code = execute(command, out / 'train.log')
        except KeyboardInterrupt:
            print(f'\ninterrupted during {name}; its last checkpoint is kept. Continue with:\n  '
                  f'{shlex.join([sys.executable, *sys.argv])}')
            raise
        finish(status_path, name, out, code, t0, states)
    for name, out, job, t0 in jobs:
        try:
            code = job.result()
        except Exception as e:  # submitit raises for jobs that failed or were cancelled
            code = -1
            with open(out / 'train.log', 'a') as f:
                f.write(f'\nsubmitit: {e}\n')
        finish(status_path, name, out, code, t0, states)
    summarise(sweep, top)
    return states


def record_unrecorded(status_path, name, out):
    """Record a finished run that status.csv lacks (the sweep was killed between the run's end and its record);
    its seconds are the sum of the epoch times in its log.txt."""
    if Path(status_path).is_file() and name in set(read_csv(status_path, 'sweep status file')['name']):
        return
    from results_table import log_seconds
    record(status_path, {'name': name, 'state': 'finished', 'exit_code': 0, 'seconds': round(log_seconds(out), 1),
                         'log_tail': ''})


def finish(status_path, name, out, code, t0, states):
    """Record one run's outcome; a failure is printed with the tail of its log and the sweep goes on."""
    states[name] = run_state(out) if code == 0 else 'failed'
    record(status_path, {'name': name, 'state': states[name], 'exit_code': code, 'seconds': round(time.time() - t0, 1),
                         'log_tail': '' if code == 0 else tail(out / 'train.log')})
    if code != 0:
        print(f'  failed (exit code {code}); the tail of {out / "train.log"}:\n' +
              '\n'.join('    ' + line for line in tail(out / 'train.log', 8).splitlines()), flush=True)


def summarise(sweep, top=5):
    """Export the sweep's TensorBoard logs with load_board.py into SWEEP/csv and print the best runs."""
    import load_board
    tb = sweep['sweep_dir'] / 'tensorboard'
    try:
        summary = load_board.export(tb, sweep['sweep_dir'] / 'csv', metric=sweep['metric'])
    except DataError as e:
        print(f'no summary: {e}')
        return None
    load_board.print_top(summary, sweep['metric'], top)
    print(f'summary: {sweep["sweep_dir"] / "csv" / "summary.csv"}')
    return summary


def get_args_parser():
    """Command-line flags of run.py."""
    p = argparse.ArgumentParser('Sweeps over main.py', allow_abbrev=False)
    p.add_argument('--config', default=None, help='sweep YAML file (see configs/)')
    p.add_argument('--sweep_dir', default=None, help='folder of the sweep (runs/, tensorboard/, csv/, status.csv)')
    p.add_argument('--base', default='', help='main.py flags shared by every run, as one string')
    p.add_argument('--grid', nargs='*', default=None, help='flag=v1,v2 ...: every combination')
    p.add_argument('--zip', nargs='*', default=None, help='flag=v1,v2 ...: element-wise')
    p.add_argument('--launcher', default=None, choices=LAUNCHERS)
    p.add_argument('--nproc_per_node', type=int, default=None, help='processes per run with --launcher torchrun')
    p.add_argument('--slurm_partition', default=None)
    p.add_argument('--slurm_time', type=int, default=None, help='minutes per run')
    p.add_argument('--slurm_gpus_per_node', type=int, default=None)
    p.add_argument('--slurm_nodes', type=int, default=None)
    p.add_argument('--slurm_cluster', default=None, help='submitit cluster: slurm (default) or local (testing)')
    p.add_argument('--metric', default=None, help='validation tag ranking the runs (default val/auroc)')
    p.add_argument('--top', type=int, default=5)
    p.add_argument('--dry_run', type=str2bool, default=False,
                   help="print the plan only: each run's state and command line")
    return p


def main(argv=None):
    """Entry point; returns {run name: state}."""
    args = get_args_parser().parse_args(argv)
    sweep = load_sweep(args)
    if args.dry_run:
        return run_sweep(sweep, True, args.slurm_cluster, args.top)
    with folder_lock(sweep['sweep_dir'], 'the sweep'):  # one sweep per folder; its runs lock their own folders
        return run_sweep(sweep, False, args.slurm_cluster, args.top)


if __name__ == '__main__':
    run_cli(main)
