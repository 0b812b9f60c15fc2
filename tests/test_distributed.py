"""torchrun with 2 gloo processes on CPU: the same metrics as 1 process, one set of outputs, exact resume."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_same_epochs, train_argv


def torchrun(argv, nproc=2, script=ROOT / 'main.py', check=True):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(script), *[str(a) for a in argv]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def ddp_argv(data, out, *extra):
    """The flags of the module's 2-epoch, 2-rank training; a loader worker per rank, as real runs have."""
    return train_argv(data, out, '--epochs', '2', '--num_workers', '1', '--nb_classes', '4', '--use_softlabel', 'True',
                      *extra)


@pytest.fixture(scope='module')
def ddp_run(elpv_small, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp') / 'out'
    return out, torchrun(ddp_argv(elpv_small, out))


def test_two_processes_write_one_set_of_outputs(ddp_run):
    out, proc = ddp_run
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    assert len(list((out / 'tensorboard').glob('events.out.tfevents.*'))) == 1
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'args.json', 'checkpoint-best.pth',  # rank 0's lock
                                                     'checkpoint-last.pth', 'config.yaml', 'finished.json', 'log.txt',
                                                     'metrics.json', 'tensorboard', 'test_predictions.csv']
    assert proc.stdout.count('epoch 2/2') == 1  # one summary line per epoch, from rank 0 only
    assert 'effective batch 16 (8 x 1 accumulation x 2 processes)' in proc.stderr
    # validation counts every sample exactly once, although 10 does not split evenly over 2 ranks with batches of 16
    assert records[-1]['val_n'] == 10
    assert records[-1]['train_images'] == 16  # 20 train images, 2 ranks x one full batch of 8 each


def test_two_processes_same_metrics_as_one(ddp_run, elpv_small, tmp_path):
    out, _ = ddp_run
    ckpt = out / 'checkpoint-best.pth'
    base = ['--eval', 'True', '--resume', ckpt, '--eval_data_path', elpv_small, '--num_workers', '0',
            '--eval_split', 'all', '--batch_size', '3']
    torchrun(base + ['--output_dir', tmp_path / 'two'], nproc=2)
    torchrun(base + ['--output_dir', tmp_path / 'one'], nproc=1)
    two = json.loads((tmp_path / 'two' / 'metrics.json').read_text())
    one = json.loads((tmp_path / 'one' / 'metrics.json').read_text())
    assert one['n'] == two['n'] == 40
    for key in ('acc', 'auroc', 'ece', 'brier', 'acc4', 'mono/auroc'):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


# main.py under torchrun, with each rank's training stopped (Ctrl-C) at the start of the second epoch
STOP_AT_SECOND_EPOCH = """import sys
sys.path[:0] = [{root!r}, {tests!r}]
import main as cli
from conftest import stopped_at
from utils import run_cli
cli.train_one_epoch = stopped_at(cli.train_one_epoch, 1, 5)
run_cli(cli.main, 'interrupted')
"""


def test_resume_under_torchrun_continues_with_same_metrics(ddp_run, elpv_small, tmp_path):
    """Stopped at the start of epoch 2 and resumed, the 2-rank run repeats the uninterrupted one (ddp_run)."""
    full, _ = ddp_run
    cut = tmp_path / 'cut'
    script = tmp_path / 'stop_at_second_epoch.py'
    script.write_text(STOP_AT_SECOND_EPOCH.format(root=str(ROOT), tests=str(ROOT / 'tests')))
    proc = torchrun(ddp_argv(elpv_small, cut), script=script, check=False)
    assert proc.returncode != 0 and 'interrupted' in proc.stderr
    assert len((cut / 'log.txt').read_text().splitlines()) == 1 and not (cut / 'finished.json').exists()
    proc = torchrun(ddp_argv(elpv_small, cut, '--auto_resume', 'True'))
    assert 'resumed from' in proc.stderr
    resumed = [json.loads(x) for x in (cut / 'log.txt').read_text().splitlines()]
    straight = [json.loads(x) for x in (full / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in resumed] == [0, 1]
    assert_same_epochs(resumed, straight, ['train_loss'], ['val_auroc'])
