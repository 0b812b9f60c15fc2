"""The kill battery's short version: SIGKILL a training and a prediction report mid-way, run them again, and
check with the battery's own checks that nothing was lost (scripts/kill_battery.py runs the long version)."""
import importlib.util
import json

import pandas as pd

from conftest import ROOT

spec = importlib.util.spec_from_file_location('kill_battery', ROOT / 'scripts' / 'kill_battery.py')
kill_battery = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_battery)


def test_killed_training_and_report_lose_nothing(tmp_path):
    summary = kill_battery.main(['--kills', '1', '--kinds', 'train', 'pred', '--epochs', '2', '--out',
                                 str(tmp_path / 'kb')])
    assert list(summary['kind']) == ['train', 'pred'] and summary['lost'].sum() == 0
    kills = pd.read_csv(tmp_path / 'kb' / 'kills.csv')
    assert len(kills) == 2 and not kills['lost'].any()
    log = [json.loads(x) for x in (tmp_path / 'kb' / 'train' / 'kill00' / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1]


def test_the_checks_see_a_lost_epoch(tmp_path):
    """The battery's check is not blind: a run whose log lost an epoch, or whose metrics moved, is reported."""
    ref, run = tmp_path / 'ref', tmp_path / 'run'
    for folder in (ref, run):
        folder.mkdir()
        (folder / 'finished.json').write_text('{}')
        (folder / 'metrics.json').write_text(json.dumps({'acc': 0.5}))
    lines = [json.dumps({'epoch': e, 'train_loss': 0.5 - e / 10, 'val_auroc': 0.6}) for e in range(3)]
    (ref / 'log.txt').write_text('\n'.join(lines) + '\n')
    (run / 'log.txt').write_text('\n'.join(lines) + '\n')
    assert kill_battery.check_run(run, ref, 3) == []
    (run / 'log.txt').write_text('\n'.join([lines[0], lines[2]]) + '\n')
    assert kill_battery.check_run(run, ref, 3)
    (run / 'log.txt').write_text('\n'.join(lines[:2] + [lines[2].replace('0.6', '0.61')]) + '\n')
    assert kill_battery.check_run(run, ref, 3) == ['epoch 2: metrics differ from the reference']
