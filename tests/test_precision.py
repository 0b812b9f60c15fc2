"""--use_amp auto / --channels_last auto: the timed probe, the remembered choice, explicit flags winning; and
--reuse_freed_memory."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import precision
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]


def flags(**kw):
    base = dict(use_amp='auto', channels_last='auto', depthwise_fp32='auto', amp_dtype='bfloat16',
                model='convnext_atto', input_size=32, batch_size=2, in_chans=3)
    return SimpleNamespace(**{**base, **kw})


def tiny():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 2))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / 'precision.json'
    monkeypatch.setenv('CONVNEXT_PRECISION_CACHE', str(path))
    return path


TIMES = {'fp32': 1.0, 'fp32 channels_last': 0.9, 'bf16': 0.7, 'bf16 channels_last': 0.5, 'bf16 depthwise fp32': 0.6,
         'bf16 channels_last depthwise fp32': 0.8}


def fake_times(monkeypatch, times, inference_times=None):
    """Make the probe measure the given seconds per candidate label (``inference_times`` for forward passes);
    returns the list of probed labels."""
    probed = []

    def timed(model, settings, batch, steps=precision.PROBE_STEPS, give_up_after=None, train=True):
        label = precision.settings_label(settings)
        probed.append(label)
        return (times if train or inference_times is None else inference_times)[label]

    monkeypatch.setattr(precision, 'time_step', timed)
    return probed


def test_probe_picks_the_fastest_and_remembers_it(cache, monkeypatch):
    probed = fake_times(monkeypatch, TIMES)
    cpu = torch.device('cpu')
    assert precision.choose(flags(), cpu, tiny) == (True, True, False, 'bfloat16')
    assert sorted(probed) == sorted(precision.CANDIDATES)
    saved = json.loads(cache.read_text())
    assert list(saved.values()) == [TIMES]
    assert 'convnext_atto | 32px | batch 2 | 3ch' in next(iter(saved))
    # remembered: no second probe; an explicit flag restricts the choice to what it allows
    assert precision.choose(flags(use_amp=False), cpu, tiny) == (False, True, False, 'bfloat16')
    assert precision.choose(flags(channels_last=False), cpu, tiny) == (True, False, True, 'bfloat16')
    assert precision.choose(flags(channels_last=False, depthwise_fp32=False), cpu, tiny) == \
        (True, False, False, 'bfloat16')
    assert precision.choose(flags(depthwise_fp32=True), cpu, tiny) == (True, False, True, 'bfloat16')
    assert len(probed) == 6
    # another model, input size or batch is another key, probed anew
    precision.choose(flags(batch_size=4), cpu, tiny)
    assert len(probed) == 12 and len(json.loads(cache.read_text())) == 2


def test_cache_of_fewer_candidates_is_probed_again(cache, monkeypatch):
    # an entry remembered before the depthwise candidates existed is measured again, with all six
    probed = fake_times(monkeypatch, {**TIMES, 'bf16 depthwise fp32': 0.3})
    key = precision.probe_key(torch.device('cpu'), flags())
    four = ('fp32', 'fp32 channels_last', 'bf16', 'bf16 channels_last')
    cache.write_text(json.dumps({key: {label: TIMES[label] for label in four}}))
    assert precision.choose(flags(), torch.device('cpu'), tiny) == (True, False, True, 'bfloat16')
    assert len(probed) == 6 and json.loads(cache.read_text())[key]['bf16 depthwise fp32'] == 0.3


class CountingTiny(torch.nn.Module):
    """``tiny()`` recording, for each forward call, the batch size, training mode and whether grad is recorded."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = tiny(), []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled()))
        return self.net(x)


def test_inference_probe_times_forward_passes_of_the_evaluation_batch(cache):
    model = CountingTiny()
    times = precision.probe(flags(), torch.device('cpu'), lambda: model, inference=True)
    assert set(times) == set(precision.CANDIDATES) and all(t > 0 for t in times.values())
    # fp32 timed in full, each other candidate at least warmed up (a slow one is given up after that)
    n = len(precision.CANDIDATES)
    assert 1 + precision.PROBE_STEPS + n - 1 <= len(model.calls) <= n * (1 + precision.PROBE_STEPS)
    assert set(model.calls) == {(2 * precision.EVAL_BATCH_FACTOR, False, False)}  # eval mode, no autograd
    assert all(p.grad is None for p in model.parameters())
    model = CountingTiny()  # the training probe: training mode, grad, backward
    precision.probe(flags(), torch.device('cpu'), lambda: model)
    assert set(model.calls) == {(2, True, True)} and all(p.grad is None for p in model.parameters())


def test_inference_choice_is_remembered_apart_from_training(cache, monkeypatch):
    # training is fastest in bf16 channels_last, inference in fp32: each mode gets its own answer
    inference = dict(zip(precision.CANDIDATES, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)))
    probed = fake_times(monkeypatch, TIMES, inference)
    cpu = torch.device('cpu')
    assert precision.choose(flags(), cpu, tiny)[:3] == (True, True, False)
    assert precision.choose(flags(), cpu, tiny, inference=True)[:3] == (False, False, False)
    assert len(probed) == 12
    saved = json.loads(cache.read_text())
    inference_keys = [k for k in saved if k.endswith(' | inference')]
    assert len(saved) == 2 and len(inference_keys) == 1
    assert f'batch {2 * precision.EVAL_BATCH_FACTOR} | 3ch | inference' in inference_keys[0]
    assert saved[inference_keys[0]]['fp32'] == 0.1
    assert precision.choose(flags(), cpu, tiny, inference=True)[:2] == (False, False) and len(probed) == 12


def test_slow_bf16_machine_stays_fp32(cache, monkeypatch):
    fake_times(monkeypatch, dict(zip(precision.CANDIDATES, (0.6, 0.62, 1.0, 0.97, 0.9, 0.95))))
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:3] == (False, False, False)


def test_explicit_flags_skip_the_probe(cache, monkeypatch):
    probed = fake_times(monkeypatch, {})
    cpu = torch.device('cpu')
    assert precision.choose(flags(use_amp=True, channels_last=False, depthwise_fp32=False), cpu, tiny) == \
        (True, False, False, 'bfloat16')
    # without autocast the depthwise convolutions are fp32 already: auto means False, no probe
    assert precision.choose(flags(use_amp=False, channels_last=True), cpu, tiny) == (False, True, False, 'bfloat16')
    assert probed == [] and not cache.exists()
    with pytest.raises(DataError, match='--use_amp must be True, False or auto'):
        precision.choose(flags(use_amp='maybe'), cpu, tiny)
    with pytest.raises(DataError, match='--depthwise_fp32 True .* needs --use_amp True or auto'):
        precision.choose(flags(use_amp=False, depthwise_fp32=True), cpu, tiny)


def test_unreadable_cache_is_probed_again(cache, monkeypatch):
    cache.write_bytes(b'\x80\x04\x95 not json')  # e.g. a pickle: never loaded as anything but JSON
    probed = fake_times(monkeypatch, dict(zip(precision.CANDIDATES, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))))
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:2] == (False, False)
    assert len(probed) == 6 and len(json.loads(cache.read_text())) == 1
    # a hand-edited entry with a non-number is measured again too
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: dict.fromkeys(precision.CANDIDATES, 'fast')}))
    assert precision.choose(flags(), torch.device('cpu'), tiny)[:2] == (False, False) and len(probed) == 12


def test_real_probe_measures_and_keeps_the_rng(cache):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    times = precision.probe(flags(), torch.device('cpu'), tiny)
    assert set(times) == set(precision.CANDIDATES) and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), before)  # a training's initialisation does not depend on the probe


class SlowUnderAutocast(torch.nn.Module):
    """A tiny model whose steps under CPU autocast take 0.4 s (as bf16 does on a CPU without native support)."""

    def __init__(self):
        super().__init__()
        self.net, self.amp_forwards = tiny(), 0

    def forward(self, x):
        if torch.is_autocast_enabled('cpu'):
            self.amp_forwards += 1
            time.sleep(0.4)
        return self.net(x)


def test_probe_stops_timing_a_candidate_far_slower_than_the_best(cache):
    model = SlowUnderAutocast()
    times = precision.probe(flags(), torch.device('cpu'), lambda: model)
    assert times['bf16'] >= 0.4 and times['bf16 channels_last'] >= 0.4 and times['fp32'] < 0.1
    n_amp = sum(amp for amp, _, _ in precision.CANDIDATES.values())
    assert model.amp_forwards == n_amp  # one warm-up step each, none timed after it (4 steps each otherwise)
    assert precision.choose(flags(), torch.device('cpu'), lambda: SlowUnderAutocast())[0] is False
    # a candidate within the limit is timed in full
    model = SlowUnderAutocast()
    seconds = precision.time_step(model, precision.DeviceSettings(torch.device('cpu'), True, 'bfloat16', False),
                                  torch.randn(2, 3, 32, 32), give_up_after=10.0)
    assert model.amp_forwards == 1 + precision.PROBE_STEPS and seconds >= 0.4


def compile_flags(**kw):
    return flags(**{'compile': 'auto', 'use_amp': False, 'channels_last': False, **kw})


def fake_compile(monkeypatch, entry):
    """Make the compile probe return ``entry``; returns the list of its calls."""
    calls = []
    monkeypatch.setattr(precision, 'probe_compile', lambda build, settings, batch: calls.append(1) or dict(entry))
    return calls


def test_compile_auto_weighs_compile_time_against_the_run(cache, monkeypatch, caplog):
    caplog.set_level('INFO')
    calls = fake_compile(monkeypatch, {'eager': 0.30, 'compiled': 0.20, 'compile': 60.0})
    fake_times(monkeypatch, {'fp32': 0.30, 'bf16': 0.30})
    settings = precision.DeviceSettings(torch.device('cpu'))
    # 1000 steps: 300 s eager against 60 + 200 s compiled -> compile; measured once, then remembered
    assert precision.choose_compile(compile_flags(), settings, tiny, 1000) is True
    assert precision.choose_compile(compile_flags(), settings, tiny, 1000) is True and calls == [1]
    assert 'fp32 | compile' in next(iter(json.loads(cache.read_text())))
    # 500 steps: 150 s eager against 60 + 100 s -> eager, from the same remembered timing
    assert precision.choose_compile(compile_flags(), settings, tiny, 500) is False and calls == [1]
    assert '--compile False: 500 steps eager 2.5 min, compiled 2.7 min' in caplog.text
    # another precision is another entry
    assert precision.choose_compile(compile_flags(use_amp=True), precision.DeviceSettings(
        torch.device('cpu'), use_amp=True), tiny, 1000) is True and calls == [1, 1]


def test_compile_auto_skips_short_runs_and_failing_compilers(cache, monkeypatch):
    calls = fake_compile(monkeypatch, {'error': 'InductorError: no C++ compiler'})
    fake_times(monkeypatch, {'fp32': 0.01})
    settings = precision.DeviceSettings(torch.device('cpu'))
    # 100 steps x 0.01 s: far too short for any compile to pay off; nothing is probed or written
    assert precision.choose_compile(compile_flags(), settings, tiny, 100) is False
    assert calls == [] and not cache.exists()
    # long enough, but the compiler fails: eager, and the failure is remembered
    assert precision.choose_compile(compile_flags(), settings, tiny, 10 ** 5) is False
    assert precision.choose_compile(compile_flags(), settings, tiny, 10 ** 5) is False and calls == [1]
    # explicit values win without a probe; others are refused
    assert precision.choose_compile(compile_flags(compile=True), settings, tiny, 1) is True
    with pytest.raises(DataError, match='--compile must be True, False or auto'):
        precision.choose_compile(compile_flags(compile='yes'), settings, tiny, 1)
    # a hand-edited timing that is not numbers is measured again
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {'eager': 'fast', 'compiled': 1, 'compile': 1}}))
    precision.choose_compile(compile_flags(), settings, tiny, 10 ** 5)
    assert calls == [1, 1]


def test_precision_and_compile_are_chosen_together(cache, monkeypatch):
    """With both auto, the candidates compete by their whole run: here the fastest eager one (bf16 channels_last)
    compiles slower, and bf16 with fp32 depthwise convolutions compiles to half its eager step."""
    probed = fake_times(monkeypatch, TIMES)
    ratios = {'bf16 channels_last': 1.2, 'bf16 depthwise fp32': 0.5}  # compiled / eager step; the others 1.1
    clock, timed = [0.0], []

    def fake_compile(build, settings, batch):  # takes 70 s of the fake clock
        label = precision.settings_label(settings)
        timed.append(label)
        clock[0] += 70.0
        eager = TIMES[label]
        return {'eager': eager, 'compiled': eager * ratios.get(label, 1.1), 'compile': 60.0}

    monkeypatch.setattr(precision, 'probe_compile', fake_compile)
    monkeypatch.setattr(precision.time, 'perf_counter', lambda: clock[0])
    cpu, auto = torch.device('cpu'), compile_flags(use_amp='auto', channels_last='auto')
    # 1000 steps x 0.5 s: 50 s for the search, spent on the first candidate; it stays eager
    assert precision.choose_run(auto, cpu, tiny, 1000) == (True, True, False, 'bfloat16', False)
    assert timed == ['bf16 channels_last'] and len(probed) == 6
    # 10,000 steps: 500 s; the search goes on down the ranking (the first timing remembered) and finds the
    # compiled depthwise candidate: 60 + 10,000 x 0.3 s against 5,000 s eager
    assert precision.choose_run(auto, cpu, tiny, 10 ** 4) == (True, False, True, 'bfloat16', True)
    assert timed[:2] == ['bf16 channels_last', 'bf16 depthwise fp32'] and len(timed) <= 1 + 500 // 70 + 1
    assert sum(k.endswith(' | compile') for k in json.loads(cache.read_text())) == len(timed)
    # a short run stays eager without timing anything more; an explicit precision decides compiling for it alone
    n = len(timed)
    assert precision.choose_run(auto, cpu, tiny, 50) == (True, True, False, 'bfloat16', False)
    # a time budget of 25 s holds 50 of the 10^6 steps at 0.5 s: as short a run
    assert precision.choose_run(auto, cpu, tiny, 10 ** 6, max_seconds=25) == (True, True, False, 'bfloat16', False)
    assert len(timed) == n
    assert precision.choose_run(compile_flags(use_amp=True, channels_last=False, depthwise_fp32=True), cpu, tiny,
                                10 ** 4) == (True, False, True, 'bfloat16', True)
    assert len(timed) == n and len(probed) == 6  # both remembered


def test_real_compile_probe_times_a_tiny_model():
    entry = precision.probe_compile(tiny, precision.DeviceSettings(torch.device('cpu')), torch.randn(2, 3, 32, 32))
    assert precision.valid_compile_entry(entry)
    if 'error' not in entry:  # a machine without a working compiler reports the error instead
        assert entry['eager'] > 0 and entry['compiled'] > 0 and entry['compile'] > entry['compiled']


def test_norm_layer_and_roadmap_steps_are_remembered_apart():
    cpu = torch.device('cpu')
    keys = {precision.probe_key(cpu, flags(norm_layer='layernorm')), precision.probe_key(cpu, flags(norm_layer='batchnorm')),
            precision.probe_key(cpu, flags(model='resnet', resnet_kernel_size=3)),
            precision.probe_key(cpu, flags(model='resnet', resnet_kernel_size=7))}
    assert len(keys) == 4


FAULTS = """
import ctypes, resource, sys, torch
import runtime
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so faults count pages touched afresh
if sys.argv[1] == 'True':
    assert runtime.reuse_freed_memory()
def step():
    blocks = [torch.ones(4 << 20) for _ in range(8)]  # 8 x 16 MiB of activations, freed together
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(os, 'confstr') or 'glibc' not in (os.confstr('CS_GNU_LIBC_VERSION') or ''),
                    reason='mallopt is glibc')
def test_reuse_freed_memory_stops_page_faults_of_later_steps():
    """runtime.reuse_freed_memory: the pages of one step's freed tensors serve the next steps; glibc's defaults
    hand them back and fault (some of) them in again (up to a page fault per 4 KiB: 131,000 for these four steps)."""
    faults = {}
    for flag in ('False', 'True'):
        proc = subprocess.run([sys.executable, '-c', FAULTS, flag], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[flag] = int(proc.stdout.split()[-1])
    pages = 4 * 8 * 4096  # touched by the four later steps
    assert faults['True'] < pages // 8  # about 4,096 here: the later steps reuse the first step's pages
    assert faults['False'] > 2 * faults['True']  # 131,000 alone; about 37,000 once in a busier test session


def test_device_settings_reuses_freed_memory_only_when_asked(monkeypatch):
    """--reuse_freed_memory True calls runtime.reuse_freed_memory before the probe; False leaves malloc alone."""
    import runtime
    calls = []
    monkeypatch.setattr(runtime, 'reuse_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.setattr(runtime, 'choose_precision',
                        lambda args, device, build, inference: (False, False, False, 'bfloat16'))
    for flag, expected in ((False, 0), (True, 1)):
        calls.clear()
        runtime.device_settings(SimpleNamespace(reuse_freed_memory=flag), torch.device('cpu'))
        assert len(calls) == expected
