"""--num_workers -1: loader workers chosen by a timed probe of loading and training on the CPU, remembered."""
import json
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import workers
from engine import DeviceSettings
from tests.conftest import train_argv

CPU = DeviceSettings(torch.device('cpu'), False, 'bfloat16', False)


def flags(**kw):
    base = dict(num_workers=-1, model='convnext_atto', input_size=16, batch_size=4, in_chans=3)
    return SimpleNamespace(**{**base, **kw})


class Slow(Dataset):
    """16 images [3, 16, 16]; each load sleeps ``delay`` seconds."""
    transform = 'slow loader'

    def __init__(self, delay=0.0):
        self.delay = delay

    def __len__(self):
        return 16

    def __getitem__(self, i):
        time.sleep(self.delay)
        return torch.rand(3, 16, 16), 0, i


def tiny():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2))


def loaders(dataset):
    return lambda n: DataLoader(dataset, batch_size=4, shuffle=True, num_workers=n, drop_last=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / 'precision.json'
    monkeypatch.setenv('CONVNEXT_PRECISION_CACHE', str(path))
    return path


def fake_probe(times, calls):
    def probe(settings, build, make_loader, counts, steps_per_epoch):
        calls.append(list(counts))
        return {n: times[n] for n in counts}
    return probe


def test_explicit_count_is_kept_without_a_probe(cache):
    def no_loader(n):
        raise AssertionError('probed')
    assert workers.choose_workers(flags(num_workers=3), CPU, tiny, no_loader, 100, 10, 1) == 3
    assert not cache.exists()


def test_faster_count_wins_and_is_remembered(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(workers, 'probe_workers', fake_probe({1: 30.0, 0: 20.0}, calls))
    make = loaders(Slow())
    assert workers.choose_workers(flags(), CPU, tiny, make, 100, 10, 1) == 0
    assert calls == [[1, 0]]
    entry = json.loads(cache.read_text())
    (key, value), = entry.items()
    assert value == {'1': 30.0, '0': 20.0} and '| workers 1,0 in turns |' in key and '| fp32 |' in key
    # the next run reads the answer; a slower worker count would have won had it been measured again
    monkeypatch.setattr(workers, 'probe_workers', fake_probe({1: 10.0, 0: 20.0}, calls))
    assert workers.choose_workers(flags(), CPU, tiny, make, 100, 10, 1) == 0 and len(calls) == 1
    # another precision or another transform is another question
    bf16 = DeviceSettings(torch.device('cpu'), True, 'bfloat16', True)
    assert workers.choose_workers(flags(), bf16, tiny, make, 100, 10, 1) == 1 and len(calls) == 2
    other = Slow()
    other.transform = 'another transform'
    assert workers.choose_workers(flags(), CPU, tiny, loaders(other), 100, 10, 1) == 1 and len(calls) == 3


def test_worker_wins_when_it_is_faster(cache, monkeypatch):
    monkeypatch.setattr(workers, 'probe_workers', fake_probe({2: 10.0, 0: 20.0}, []))
    assert workers.choose_workers(flags(), CPU, tiny, loaders(Slow()), 100, 10, 2) == 2


def test_default_without_a_probe(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(workers, 'probe_workers', fake_probe({1: 30.0, 0: 20.0}, calls))
    make = loaders(Slow())
    assert workers.choose_workers(flags(), CPU, tiny, make, 10, 2, 1) == 1  # a run shorter than 10 probes
    assert workers.choose_workers(flags(), CPU, tiny, make, 100, 10, 0) == 0  # one core: nothing to compare
    assert workers.choose_workers(flags(), CPU, tiny, make, 8, 1000, 1) == 1  # an epoch shorter than the probe
    gpu = DeviceSettings(torch.device('cuda'), True, 'bfloat16', True)
    assert workers.choose_workers(flags(), gpu, tiny, make, 100, 10, 4) == 4  # the step runs on the GPU
    assert calls == [] and not cache.exists()


def test_probe_times_real_loading_and_leaves_the_rngs_as_they_were(monkeypatch):
    monkeypatch.setattr(workers, 'PROBE_BATCHES', 3)  # the 4 batches of an epoch of Slow
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    delay = 0.02
    epoch_s = workers.probe_workers(CPU, tiny, loaders(Slow(delay)), [1, 0], steps_per_epoch=4)
    assert set(epoch_s) == {1, 0}
    # without a worker every batch waits for its 4 loads: an epoch of 4 batches takes at least 16 of them
    assert epoch_s[0] >= 16 * delay
    assert all(t > 0 for t in epoch_s.values())
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_timed_step_waits_for_the_batch():
    loader = loaders(Slow(0.05))(0)
    assert workers.timed_step(tiny().train(), CPU, iter(loader)) >= 4 * 0.05


def test_transform_id_is_stable_and_tells_transforms_apart():
    a, b = Slow(), Slow()
    assert workers.transform_id(a) == workers.transform_id(b)
    b.transform = 'other'
    assert workers.transform_id(a) != workers.transform_id(b)


def test_training_run_records_the_chosen_count(elpv_small, tmp_path, cache, monkeypatch):
    import main
    monkeypatch.setattr(workers, 'MIN_RUN_FACTOR', 0)
    monkeypatch.setattr(workers, 'PROBE_BATCHES', 1)  # 2 steps an epoch
    argv = train_argv(elpv_small, tmp_path / 'run', '--epochs', '1', '--use_amp', 'False', '--channels_last',
                      'False', '--compile', 'False')
    argv[argv.index('--num_workers') + 1] = '-1'
    monkeypatch.setattr('runtime.default_workers', lambda world_size=1: 1)
    main.main(argv)
    saved = json.loads((tmp_path / 'run' / 'args.json').read_text())
    (key, epoch_s), = json.loads(cache.read_text()).items()
    assert set(epoch_s) == {'1', '0'} and '| workers 1,0 in turns |' in key
    assert saved['num_workers'] == min((0, 1), key=lambda n: (epoch_s[str(n)], n))
