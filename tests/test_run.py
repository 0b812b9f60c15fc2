"""run.py: planning, naming, skip/resume/failure handling, the SLURM path through submitit's local executor."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import run as sweeps
from conftest import ROOT
from utils import DataError

TINY = ('--model convnext_atto --input_size 32 --batch_size 8 --num_workers 0 --test_val_ratio 0.25 0.25 '
        '--drop_path 0 --warmup_epochs 0 --test False')


def plan(argv):
    return sweeps.plan_runs(sweeps.load_sweep(sweeps.get_args_parser().parse_args(argv)))


def test_names_readable_unique_and_safe():
    runs = plan(['--sweep_dir', 'x', '--grid', 'soft_label_ratio=0.6,0.7', 'nb_classes=2,4',
                 '--zip', 'model=convnext_atto,convnextv2_atto', 'lr=1e-3,5e-4'])
    names = [r['name'] for r in runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert 'lr-1e-3_model-convnext_atto_nb_classes-4_soft_label_ratio-0.7' in names
    odd = plan(['--sweep_dir', 'x', '--grid', 'data_path=a/b c,a-b-c'])
    assert [r['name'] for r in odd] == ['data_path-a-b-c', 'data_path-a-b-c_2']
    assert all(sweeps.safe(n) == n for n in names)


def test_yaml_and_command_line_give_the_same_plan(tmp_path):
    cfg = tmp_path / 'sweep.yaml'
    cfg.write_text('sweep_dir: s\nbase:\n  data_path: data/elpv\n  epochs: 3\n  use_softlabel: true\n'
                   '  test_val_ratio: [0.25, 0.1]\ngrid:\n  soft_label_ratio: [0.6, 0.7]\n  nb_classes: [2, 4]\n'
                   'zip:\n  lr: [1e-3, 2e-3]\n  model: [convnext_atto, convnext_femto]\n')
    from_yaml = plan(['--config', str(cfg)])
    from_cli = plan(['--sweep_dir', 's', '--base', '--data_path data/elpv --epochs 3 --use_softlabel True '
                     '--test_val_ratio 0.25 0.1', '--grid', 'soft_label_ratio=0.6,0.7', 'nb_classes=2,4',
                     '--zip', 'lr=1e-3,2e-3', 'model=convnext_atto,convnext_femto'])
    assert from_yaml == from_cli and len(from_yaml) == 8


@pytest.mark.parametrize('argv,match', [
    (['--sweep_dir', 's', '--zip', 'lr=1,2', 'model=a'], 'same length'),
    (['--sweep_dir', 's', '--base', '--output_dir o'], 'output_dir is set by run.py'),
    (['--grid', 'lr=1'], 'sweep_dir'),
])
def test_sweep_errors(argv, match):
    with pytest.raises(DataError, match=match):
        plan(argv)


def sweep_argv(elpv_small, sweep_dir, grid, epochs=1):
    return ['--sweep_dir', str(sweep_dir), '--base', f'--data_path {elpv_small} --epochs {epochs} {TINY}',
            '--grid', *grid]


def test_skip_finished_record_failure_and_go_on(elpv_small, tmp_path, capsys):
    argv = sweep_argv(elpv_small, tmp_path / 's', ['soft_label_ratio=0.7,1.5'])
    states = sweeps.main(argv)
    assert states == {'soft_label_ratio-0.7': 'finished', 'soft_label_ratio-1.5': 'failed'}
    status = pd.read_csv(tmp_path / 's' / 'status.csv').set_index('name')
    assert status.loc['soft_label_ratio-1.5', 'exit_code'] == 1
    assert 'soft_label_ratio must lie in [0, 1]' in status.loc['soft_label_ratio-1.5', 'log_tail']
    run_dir = tmp_path / 's' / 'runs' / 'soft_label_ratio-0.7'
    command = (run_dir / 'command.txt').read_text()
    assert '--output_dir' in command and '--log_name soft_label_ratio-0.7' in command
    summary = pd.read_csv(tmp_path / 's' / 'csv' / 'summary.csv')
    assert summary['run'].tolist() == ['soft_label_ratio-0.7']
    mtime = (run_dir / 'checkpoint-last.pth').stat().st_mtime_ns
    capsys.readouterr()
    sweeps.main(argv + ['--dry_run', 'True'])
    out = capsys.readouterr().out
    assert 'skip (finished)  soft_label_ratio-0.7' in out and 'run              soft_label_ratio-1.5' in out
    commands = [line.split() for line in out.splitlines() if 'main.py' in line]
    assert len(commands) == 2
    value = {flag: commands[1][commands[1].index(flag) + 1] for flag in ('--soft_label_ratio', '--output_dir')}
    assert value == {'--soft_label_ratio': '1.5', '--output_dir': str(tmp_path / 's' / 'runs' / 'soft_label_ratio-1.5')}
    sweeps.main(argv)
    assert (run_dir / 'checkpoint-last.pth').stat().st_mtime_ns == mtime


def test_interrupted_run_resumes(elpv_small, tmp_path):
    sweep_dir = tmp_path / 's'
    argv = sweep_argv(elpv_small, sweep_dir, ['seed=0'], epochs=60)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen([sys.executable, str(ROOT / 'run.py'), *argv], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = sweep_dir / 'runs' / 'seed-0' / 'checkpoint-last.pth'
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), 'no checkpoint written in time'
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-training, no chance to clean up
    proc.wait()
    assert sweeps.run_state(sweep_dir / 'runs' / 'seed-0') == 'interrupted'
    import torch
    done = torch.load(ckpt, weights_only=True)['epoch'] + 2  # epochs finished, plus one more after resuming
    short = sweep_argv(elpv_small, sweep_dir, ['seed=0'], epochs=done)  # same run name, ends sooner
    states = sweeps.main(short)
    assert states == {'seed-0': 'finished'}
    log = (sweep_dir / 'runs' / 'seed-0' / 'train.log').read_text()
    assert 'resumed from' in log
    import json
    records = [json.loads(x) for x in (sweep_dir / 'runs' / 'seed-0' / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == list(range(done))


def test_slurm_path_with_submitit_local_executor(elpv_small, tmp_path, monkeypatch):
    pytest.importorskip('submitit')
    monkeypatch.setenv('PYTHONPATH', str(ROOT))
    argv = sweep_argv(elpv_small, tmp_path / 's', ['nb_classes=2,4']) + ['--launcher', 'slurm',
                                                                         '--slurm_cluster', 'local',
                                                                         '--slurm_time', '10']
    states = sweeps.main(argv)
    assert states == {'nb_classes-2': 'finished', 'nb_classes-4': 'finished'}
    assert (tmp_path / 's' / 'slurm' / 'nb_classes-2').is_dir()
    assert len(pd.read_csv(tmp_path / 's' / 'csv' / 'summary.csv')) == 2


def test_sigterm_to_the_sweep_reaches_the_run(elpv_small, tmp_path):
    from utils import folder_lock
    sweep_dir = tmp_path / 's'
    proc = subprocess.Popen([sys.executable, str(ROOT / 'run.py'), *sweep_argv(elpv_small, sweep_dir, ['seed=0'],
                                                                               epochs=60)],
                            cwd=ROOT, env={**os.environ, 'PYTHONUNBUFFERED': '1'}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = sweep_dir / 'runs' / 'seed-0'
    deadline = time.time() + 120
    while not (run_dir / 'checkpoint-last.pth').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to run.py only, as a scheduler stopping the sweep's job would
    assert proc.wait(timeout=180) == 143
    with folder_lock(run_dir):  # the training stopped too: nothing holds its folder any more
        pass
    assert sweeps.run_state(run_dir) == 'interrupted' and 'interrupted' in (run_dir / 'train.log').read_text()


def test_slurm_executor_one_task_per_gpu_on_two_nodes(tmp_path, monkeypatch):
    submitit = pytest.importorskip('submitit')
    monkeypatch.setattr(submitit.SlurmExecutor, 'affinity', classmethod(lambda cls: 1))  # no srun on this machine
    sweep = {'sweep_dir': tmp_path / 's', 'slurm': {'partition': 'gpu', 'time': 30, 'nodes': 2, 'gpus_per_node': 4}}
    params = sweeps.slurm_executor(sweep, 'run-a', cluster='slurm')._executor.parameters
    assert params['nodes'] == 2 and params['ntasks_per_node'] == 4 and params['gpus_per_node'] == 4
    assert params['partition'] == 'gpu' and params['time'] == 30
    cpu = sweeps.slurm_executor({**sweep, 'slurm': {'time': 5}}, 'run-b', cluster='slurm')._executor.parameters
    assert cpu['ntasks_per_node'] == 1 and 'gpus_per_node' not in cpu


def test_task_environment_for_two_nodes_of_four_gpus():
    from types import SimpleNamespace
    envs = [sweeps.task_environment(SimpleNamespace(global_rank=n * 4 + g, local_rank=g, num_tasks=8, num_nodes=2,
                                                    hostnames=['node-a', 'node-b'], job_id='4242'))
            for n in range(2) for g in range(4)]
    assert [e['RANK'] for e in envs] == [str(r) for r in range(8)]
    assert [e['LOCAL_RANK'] for e in envs] == [str(g) for g in (0, 1, 2, 3) * 2]
    assert {e['WORLD_SIZE'] for e in envs} == {'8'} and {e['LOCAL_WORLD_SIZE'] for e in envs} == {'4'}
    assert {e['MASTER_ADDR'] for e in envs} == {'node-a'} and len({e['MASTER_PORT'] for e in envs}) == 1
    other = sweeps.task_environment(SimpleNamespace(global_rank=0, local_rank=0, num_tasks=8, num_nodes=2,
                                                    hostnames=['node-a', 'node-b'], job_id='4243'))
    assert 20000 <= int(other['MASTER_PORT']) < 40000


def test_preempted_task_stops_the_training_and_requeues_itself(tmp_path):
    pytest.importorskip('submitit')
    marker = tmp_path / 'stopped'
    child = ('import signal, sys, time\n'
             f'signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, "w").write("term"), sys.exit(143)))\n'
             'print("ready", flush=True)\n'
             'time.sleep(60)\n')
    task = sweeps.SlurmTask()
    command = [sys.executable, '-c', child]
    task.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert task.proc.stdout.readline().strip() == 'ready'
    delayed = task.checkpoint(command, str(tmp_path / 'train.log'))
    assert marker.read_text() == 'term'  # the training got SIGTERM, as main.py's clean stop expects
    assert isinstance(delayed.function, sweeps.SlurmTask) and delayed.function.proc is None
    assert delayed.args == (command, str(tmp_path / 'train.log'))
    import pickle
    pickle.dumps(delayed)  # submitit pickles the requeued submission


def test_a_finished_run_missing_from_status_is_recorded(tmp_path):
    """A sweep killed between a run's end and its status.csv row records the run when it next skips it."""
    out = tmp_path / 'runs' / 'seed-0'
    out.mkdir(parents=True)
    (out / 'log.txt').write_text('{"epoch": 0, "time_s": 2.5}\n{"epoch": 1, "time_s": 3.0}\n')
    status = tmp_path / 'status.csv'
    sweeps.record_unrecorded(status, 'seed-0', out)
    row = pd.read_csv(status).iloc[0]
    assert row['name'] == 'seed-0' and row['state'] == 'finished' and row['exit_code'] == 0
    assert row['seconds'] == pytest.approx(5.5)
    sweeps.record_unrecorded(status, 'seed-0', out)  # already there: not added twice
    assert len(pd.read_csv(status)) == 1


@pytest.mark.parametrize('config', sorted(p.name for p in (ROOT / 'configs').glob('*.yaml')))
def test_every_config_plans_runs_main_accepts(config, tmp_path):
    from config import parse_with_config
    from flags import check_args, get_args_parser
    sweep = sweeps.load_sweep(sweeps.get_args_parser().parse_args(['--config', str(ROOT / 'configs' / config),
                                                                   '--sweep_dir', str(tmp_path)]))
    runs = sweeps.plan_runs(sweep)
    assert runs
    for run in runs:
        command = sweeps.build_command(run, sweep)
        args, _ = parse_with_config(get_args_parser(), command[command.index(str(ROOT / 'main.py')) + 1:])
        check_args(args)  # raises on a flag value main.py refuses
        assert args.output_dir == str(tmp_path / 'runs' / run['name'])
