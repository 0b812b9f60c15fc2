"""One writer per folder: a second training, FCMAE pretraining, prediction report or sweep on a held folder gets a
one-line error naming the holder; the OS releases the lock when its holder is killed."""
import signal
import subprocess
import sys
import time

import pytest

import main as cli
import run as sweeps
from conftest import train_argv
from utils import DataError, folder_lock


def test_second_writer_is_refused_with_the_holder(elpv_small, tmp_path):
    out = tmp_path / 'o'
    with folder_lock(out, 'the run folder'):
        with pytest.raises(DataError, match=r'the run folder is in use by another process \(pid \d+, started'):
            cli.main([str(a) for a in train_argv(elpv_small, out, '--epochs', '1')])
        with pytest.raises(DataError, match='in use by another process'):
            cli.main([str(a) for a in train_argv(elpv_small, out, '--pretrain', 'True', '--model',
                                                 'convnextv2_atto', '--epochs', '1')])
    assert not (out / 'log.txt').exists()  # nothing was written by the refused runs
    pred = tmp_path / 'pred'
    with folder_lock(pred):
        with pytest.raises(DataError, match='prediction report folder is in use'):
            cli.main(['--pred', 'True', '--resume', str(tmp_path / 'x.pth'), '--eval_data_path', str(elpv_small),
                      '--pred_save_path', str(pred)])
    sweep = tmp_path / 'sweep'
    with folder_lock(sweep):
        with pytest.raises(DataError, match='the sweep is in use'):
            sweeps.main(['--base', f'--data_path {elpv_small} --epochs 1', '--grid', 'seed=0',
                         '--sweep_dir', str(sweep)])


def test_lock_of_a_killed_process_is_free(tmp_path):
    folder = tmp_path / 'f'
    code = (f'import sys, time; sys.path.insert(0, {str(cli.__file__.rsplit("/", 1)[0])!r}); '
            f'from utils import folder_lock\nwith folder_lock({str(folder)!r}):\n    print("held", flush=True); '
            f'time.sleep(60)')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(DataError, match='in use by another process'):
        with folder_lock(folder):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    with folder_lock(folder):  # the OS released it with the process
        assert (folder / '.lock.owner').is_file()
    assert not (folder / '.lock.owner').exists()  # the holder's record goes with the lock


def test_failed_start_leaves_no_folder(tmp_path):
    with pytest.raises(DataError):
        with folder_lock(tmp_path / 'new'):
            raise DataError('bad input')
    assert not (tmp_path / 'new').exists()
