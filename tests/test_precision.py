"""--use_amp auto / --channels_last auto: the timed probe, the remembered choice, explicit flags winning."""
import json
from types import SimpleNamespace

import pytest
import torch

import precision
from utils import DataError


def flags(**kw):
    base = dict(use_amp='auto', channels_last='auto', amp_dtype='bfloat16', model='convnext_atto', input_size=32,
                batch_size=2, in_chans=3)
    return SimpleNamespace(**{**base, **kw})


def tiny():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 2))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / 'precision.json'
    monkeypatch.setenv('CONVNEXT_PRECISION_CACHE', str(path))
    return path


def fake_times(monkeypatch, times):
    """Make the probe measure the given seconds per (use_amp, channels_last); returns the list of probed settings."""
    probed = []

    def timed(model, settings, batch, steps=precision.PROBE_STEPS):
        probed.append((settings.use_amp, settings.channels_last))
        return times[(settings.use_amp, settings.channels_last)]

    monkeypatch.setattr(precision, 'time_step', timed)
    return probed


def test_probe_picks_the_fastest_and_remembers_it(cache, monkeypatch):
    probed = fake_times(monkeypatch, {(False, False): 1.0, (False, True): 0.9, (True, False): 0.7, (True, True): 0.5})
    cpu = torch.device('cpu')
    assert precision.choose(flags(), cpu, tiny) == (True, True, 'bfloat16')
    assert len(probed) == 4
    saved = json.loads(cache.read_text())
    assert list(saved.values()) == [{'fp32': 1.0, 'fp32 channels_last': 0.9, 'bf16': 0.7, 'bf16 channels_last': 0.5}]
    assert 'convnext_atto | 32px | batch 2 | 3ch' in next(iter(saved))
    # remembered: no second probe; an explicit flag restricts the choice to what it allows
    assert precision.choose(flags(use_amp=False), cpu, tiny) == (False, True, 'bfloat16')
    assert precision.choose(flags(channels_last=False), cpu, tiny) == (True, False, 'bfloat16')
    assert len(probed) == 4
    # another model, input size or batch is another key, probed anew
    precision.choose(flags(batch_size=4), cpu, tiny)
    assert len(probed) == 8 and len(json.loads(cache.read_text())) == 2


def test_slow_bf16_machine_stays_fp32(cache, monkeypatch):
    fake_times(monkeypatch, {(False, False): 0.6, (False, True): 0.62, (True, False): 1.0, (True, True): 0.97})
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:2] == (False, False)


def test_explicit_flags_skip_the_probe(cache, monkeypatch):
    probed = fake_times(monkeypatch, {})
    assert precision.choose(flags(use_amp=True, channels_last=False), torch.device('cpu'), tiny) == \
        (True, False, 'bfloat16')
    assert probed == [] and not cache.exists()
    with pytest.raises(DataError, match='--use_amp must be True, False or auto'):
        precision.choose(flags(use_amp='maybe'), torch.device('cpu'), tiny)


def test_unreadable_cache_is_probed_again(cache, monkeypatch):
    cache.write_bytes(b'\x80\x04\x95 not json')  # e.g. a pickle: never loaded as anything but JSON
    probed = fake_times(monkeypatch, {(False, False): 1.0, (False, True): 2.0, (True, False): 3.0, (True, True): 4.0})
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:2] == (False, False)
    assert len(probed) == 4 and len(json.loads(cache.read_text())) == 1
    # a hand-edited entry with a non-number is measured again too
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: dict.fromkeys(precision.CANDIDATES, 'fast')}))
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:2] == (False, False) and len(probed) == 8


def test_real_probe_measures_and_keeps_the_rng(cache):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    times = precision.probe(flags(), torch.device('cpu'), tiny)
    assert set(times) == set(precision.CANDIDATES) and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), before)  # a training's initialisation does not depend on the probe
