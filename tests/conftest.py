"""Shared fixtures: a small real ELPV subset in the prepared-root layout, and synthetic images."""
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / 'shared' / 'reference'


@pytest.fixture(scope='session', autouse=True)
def precision_cache(tmp_path_factory):
    """The --use_amp/--channels_last auto choices of this test session go into a file of its own, not the user's."""
    path = tmp_path_factory.mktemp('precision') / 'precision.json'
    os.environ['CONVNEXT_PRECISION_CACHE'] = str(path)
    return path


def elpv_source():
    """Folder of the installed elpv-dataset package's data and its label table (path, defect_prob, type)."""
    import elpv_dataset
    src = Path(elpv_dataset.__file__).parent / 'data'
    labels = pd.read_csv(src / 'labels.csv', sep=r'\s+', header=None, names=['path', 'defect_prob', 'type'])
    return src, labels


@pytest.fixture(scope='session')
def elpv_small(tmp_path_factory):
    """A prepared root of 40 real ELPV cells: 10 per label, both module types, with list.csv."""
    src, labels = elpv_source()
    names = {0: 'neg', 1: 'amb_neg', 2: 'amb_pos', 3: 'pos'}
    labels['label'] = [names[int(round(p * 3))] for p in labels['defect_prob']]
    root = tmp_path_factory.mktemp('elpv_small')
    rows = []
    for label, group in labels.groupby('label'):
        picked = pd.concat([group[group['type'] == t].head(5) for t in ('mono', 'poly')])
        for r in picked.itertuples():
            rel = f'{label}/{Path(r.path).name}'
            (root / label).mkdir(exist_ok=True)
            shutil.copy(src / r.path, root / rel)
            rows.append(dict(path=rel, label=label, type=r.type, defect_prob=r.defect_prob))
    pd.DataFrame(rows).to_csv(root / 'list.csv', index=False)
    return root


def stopped_at(fn, epoch, position):
    """``fn`` (an epoch loop's one-epoch function), raising KeyboardInterrupt (Ctrl-C) when called for ``epoch``,
    the positional argument at ``position``; a run stopped there resumes from the checkpoint of ``epoch - 1``."""
    def interrupted(*args, **kwargs):
        if args[position] == epoch:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    return interrupted


def assert_same_epochs(resumed, straight, losses, metrics=()):
    """The log.txt records (lists of dicts) of a resumed and an uninterrupted run: the same epochs, ``losses``
    within 1e-5 relative and ``metrics`` within 1e-6 absolute."""
    assert [r['epoch'] for r in resumed] == [r['epoch'] for r in straight]
    for a, b in zip(resumed, straight):
        for k in losses:
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a['epoch'], k)
        for k in metrics:
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a['epoch'], k)


def train_argv(data, out, *extra):
    """main.py flags for a tiny, fast training on ``data``."""
    return ['--data_path', str(data), '--output_dir', str(out), '--model', 'convnext_atto', '--input_size', '64',
            '--batch_size', '8', '--epochs', '2', '--num_workers', '0', '--test_val_ratio', '0.25', '0.25',
            '--drop_path', '0', '--warmup_epochs', '0', *extra]
