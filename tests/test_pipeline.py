"""Input pipeline: the decode-once image cache, worker defaults, channels_last and the --compile fallback."""
import json
import logging
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import runtime
from datasets import DefectDataset, ImageCache, build_transform, cache_side, load_splits
from main import get_args_parser


def args_for(*extra):
    return get_args_parser().parse_args(['--input_size', '32', *extra])


def test_cache_decodes_once_and_again_when_a_file_changes(elpv_small, tmp_path, caplog):
    root = tmp_path / 'data'
    shutil.copytree(elpv_small, root)
    frame = load_splits([root], (0.25, 0.25), 0)['train']
    side = cache_side(32, 1.0)
    path = tmp_path / 'cache' / 'images.safetensors'
    with caplog.at_level(logging.INFO):
        first = DefectDataset(frame, build_transform(False, args_for()), cache=ImageCache(side, path))
    assert f'decoded {len(frame)} image(s)' in caplog.text and path.is_file()
    img = first.cached[0]
    assert img.dtype == np.uint8 and img.ndim == 2 and min(img.shape) == side  # ELPV is grayscale: one channel
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = DefectDataset(frame, build_transform(False, args_for()), cache=ImageCache(side, path))
    assert 'decoded' not in caplog.text  # everything came from the file
    assert all(np.array_equal(a, b) for a, b in zip(first.cached, again.cached))
    changed = frame['path'].iloc[3]
    cv2.imwrite(changed, np.full((300, 300), 255, np.uint8))
    os.utime(changed, ns=(1, 10**18))  # a new modification time
    caplog.clear()
    with caplog.at_level(logging.INFO):
        third = DefectDataset(frame, build_transform(False, args_for()), cache=ImageCache(side, path))
    assert 'decoded 1 image(s)' in caplog.text
    assert third.cached[3].min() == 255 and np.array_equal(third.cached[0], first.cached[0])


def test_cache_keeps_enough_pixels_for_the_smallest_training_crop(elpv_small):
    # RandomResizedCrop takes as little as --scale[0] of the image's area: the cache must hold a side of at least
    # input_size / sqrt(scale[0]) so that crop is shrunk to input_size, never enlarged (a blurred input)
    frame = load_splits([elpv_small], (0.25, 0.25), 0)['train'].iloc[:2]
    for scale, crop_pct in [('1', '1.0'), ('0.25', '1.0'), ('0.5', '1.0'), ('1', '0.5')]:
        args = args_for('--scale', scale, '1', '--crop_pct', crop_pct, '--cache', 'memory')
        cache = runtime.make_cache(args, len(frame))
        ds = DefectDataset(frame, build_transform(True, args), cache=cache)
        side = min(ds.cached[0].shape[:2])
        assert side == cache.side < 300  # ELPV cells are 300 px: shrunk to the side the transforms need
        assert side * float(scale) ** 0.5 >= 32 and side >= 32 / float(crop_pct)
        assert side <= 1.1 * 32 / min(float(scale) ** 0.5, float(crop_pct)) + 1  # and no larger
    with pytest.raises(ValueError, match='min_crop_area'):
        cache_side(32, 1.0, 0.0)


def test_cached_items_match_uncached_shapes_and_are_close(elpv_small):
    frame = load_splits([elpv_small], (0.25, 0.25), 0)['val']
    args = args_for('--crop_pct', '1.0')
    plain = DefectDataset(frame, build_transform(False, args))
    cached = DefectDataset(frame, build_transform(False, args), cache=ImageCache(cache_side(32)))
    for i in range(len(frame)):
        a, b = plain[i][0], cached[i][0]
        assert a.shape == b.shape == (3, 32, 32)
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_clahe_runs_once_on_cached_images_with_the_same_items(elpv_small, caplog):
    # CLAHE (and the black-hat channel) give the same output for the same image: the dataset applies them to the
    # cached images once; every item must equal the full transform run on the raw cached image, RNG included
    from datasets import apply_fixed_steps, split_fixed_steps, to_tensor
    frame = load_splits([elpv_small], (0.25, 0.25), 0)['train'].iloc[:4]
    for extra, channels in [((), 1), (('--blackhat', '5'), 3)]:
        for train in (True, False):
            args = args_for('--clahe', '2', '--scale', '0.5', '1', '--crop_pct', '1.0', *extra)
            full = build_transform(train, args)
            raw = ImageCache(cache_side(32, 1.0, 0.5))
            with caplog.at_level(logging.INFO):
                ds = DefectDataset(frame, full, cache=raw)
            assert 'LocalContrast(clip_limit=2.0, grid=8)' in caplog.text and 'applied once to 4' in caplog.text
            assert 'LocalContrast' not in repr(ds.transform)  # split off, in training and evaluation
            assert ('RandomResizedCrop' in repr(ds.transform)) == train
            originals = raw.images(ds.paths, [None] * len(ds.paths))
            assert all(a.ndim == 2 for a in originals)  # ELPV cells are grayscale
            assert all((b.ndim == 3) == (channels == 3) for b in ds.cached)  # equal channels kept as one
            assert not any(np.array_equal(a, b if b.ndim == 2 else b[..., 0]) for a, b in zip(originals, ds.cached))
            for i in range(len(frame)):
                random.seed(i), torch.manual_seed(i)  # timm's crop draws from random, the flips from torch
                mine = ds[i][0]
                random.seed(i), torch.manual_seed(i)
                assert torch.equal(mine, to_tensor(originals[i], 3, full))
            caplog.clear()
    # without a fixed first step nothing is split off; an unreadable image stays None
    plain = build_transform(True, args_for())
    assert split_fixed_steps(plain)[0] is None
    fixed, _ = split_fixed_steps(build_transform(False, args_for('--clahe', '2')))
    assert apply_fixed_steps([None, np.zeros((8, 8), np.uint8)], fixed, 3)[0] is None


def test_corrupt_image_in_cache_is_skipped(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f'{i}.png'), np.full((40, 40, 3), 60 * i, np.uint8))
    (tmp_path / '1.png').write_bytes(b'broken')
    import pandas as pd
    frame = pd.DataFrame({'path': [str(tmp_path / f'{i}.png') for i in range(3)], 'label': ['neg', 'pos', 'neg']})
    ds = DefectDataset(frame, build_transform(False, args_for()), cache=ImageCache(36))
    assert ds[1] is None and ds[0][0].shape == (3, 32, 32) and ds[2] is not None
    assert ds.cached[0].shape == (36, 36, 3)  # colour kept as RGB


def test_default_workers_leave_a_core_for_training():
    cores = len(os.sched_getaffinity(0))
    assert runtime.default_workers(1) == max(0, min(8, cores - 1))
    assert runtime.default_workers(cores) == 0


def test_channels_last_and_compile_fallback(monkeypatch, caplog):
    from models import build_model

    def broken(*a, **k):
        raise RuntimeError('no compiler here')

    monkeypatch.setattr(torch, 'compile', broken)
    args = args_for('--compile', 'True', '--channels_last', 'True', '--model', 'convnext_atto')
    model = build_model(args)
    with caplog.at_level(logging.WARNING):
        dev = runtime.device_settings(args, torch.device('cpu'))
        run_model = runtime.prepare_model(model, args, dev)
    assert run_model is model and dev.memory_format == torch.channels_last
    assert 'torch.compile failed (RuntimeError: no compiler here); running eagerly' in caplog.text
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert run_model(x).shape == (2, 2)


def test_compile_failing_at_a_call_falls_back_to_eager_once(monkeypatch, caplog):
    import torch._dynamo
    from models import build_model
    calls = []

    def compiled_fails_on_batch_3(module, **kw):
        assert kw == {'dynamic': False}  # one static graph per batch shape

        def call(x):
            calls.append(len(x))
            if len(x) == 3:
                raise torch._dynamo.exc.TorchRuntimeError('cannot trace this shape')
            if len(x) == 4:
                raise ValueError('an error of the model itself')
            return module(x)
        return call

    monkeypatch.setattr(torch, 'compile', compiled_fails_on_batch_3)
    args = args_for('--compile', 'True', '--channels_last', 'False', '--model', 'convnext_atto')
    model = build_model(args).eval()
    run_model = runtime.prepare_model(model, args, runtime.device_settings(args, torch.device('cpu')))
    assert isinstance(run_model, runtime.CompiledModule) and calls == []  # nothing runs before the first batch
    assert [k for k, _ in run_model.state_dict().items()] == [f'module.{k}' for k in model.state_dict()]
    with pytest.raises(ValueError, match='the model itself'):
        run_model(torch.randn(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run_model(x), model(x)) and not run_model.failed
        with caplog.at_level(logging.WARNING):
            y = run_model(torch.randn(3, 3, 32, 32))
            run_model(x)
    assert y.shape == (3, 2) and run_model.failed and calls == [4, 2, 3]  # eager from then on
    assert caplog.text.count('torch.compile failed (TorchRuntimeError: cannot trace this shape); running eagerly') == 1


def test_backward_compile_failure_falls_back_and_computes_the_batch_again(monkeypatch, caplog):
    """torch compiles the backward graph at the first backward: when that fails, training warns once, runs eagerly
    from then on and computes the failed batch again, so the run trains as an eager one does."""
    import torch._dynamo
    from engine import DeviceSettings, train_one_epoch
    from models import build_model
    from softLabelLoss import SoftLabelLoss

    class BackwardDoesNotLower(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch._dynamo.exc.TorchRuntimeError('backward graph does not lower')

    monkeypatch.setattr(torch, 'compile', lambda module, **kw: lambda x: BackwardDoesNotLower.apply(module(x)))
    args = args_for('--compile', 'True', '--channels_last', 'False', '--model', 'convnext_atto', '--drop_path', '0')
    dev = DeviceSettings(torch.device('cpu'))
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 3])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels, torch.arange(6)), batch_size=3)
    trained, wrapped = [], None
    for compiled in (True, False):
        torch.manual_seed(0)
        model = build_model(args)
        run_model = runtime.prepare_model(model, args, dev) if compiled else model
        wrapped = run_model if compiled else wrapped
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with caplog.at_level(logging.WARNING):
            stats = train_one_epoch(run_model, SoftLabelLoss(2), loader, optimizer, dev, 0)
        assert stats['updates'] == 2 and stats['images'] == 6
        trained.append(model.state_dict())
    assert isinstance(wrapped, runtime.CompiledModule) and wrapped.failed and caplog.text.count(
        'torch.compile failed (TorchRuntimeError: backward graph does not lower); running eagerly') == 1
    assert all(torch.allclose(trained[0][k], trained[1][k]) for k in trained[1])


@pytest.mark.parametrize('mode,file_expected', [('file', True), ('memory', False), ('none', None)])
def test_cache_modes(mode, file_expected, tmp_path):
    cache = runtime.make_cache(args_for('--cache', mode), 10, tmp_path)
    if file_expected is None:
        assert cache is None
    else:
        assert (cache.path is not None) == file_expected


def test_tta_averages_the_eight_symmetries_or_the_four_flips():
    from engine import DeviceSettings, dihedral_views, predict_probs, tta_mode
    torch.manual_seed(0)
    images = torch.randn(5, 3, 16, 16)
    views = dihedral_views(images)
    assert len(views) == 8 and torch.equal(views[0], images)
    assert len({v[0].numpy().tobytes() for v in views}) == 8  # all different for a generic image
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2))

    def loader(x):
        return [(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)))]

    dev = DeviceSettings()
    plain, _ = predict_probs(model, loader(images), dev)
    tta, _ = predict_probs(model, loader(images), dev, tta=True)
    expected = torch.stack([model(v).softmax(-1) for v in views]).mean(0).detach().numpy()
    assert np.allclose(tta, expected, atol=1e-6) and not np.allclose(tta, plain, atol=1e-3)
    # the prediction no longer depends on how the image was turned
    turned, _ = predict_probs(model, loader(torch.rot90(images, 1, dims=(-2, -1))), dev, tta=True)
    assert np.allclose(turned, tta, atol=1e-5)
    # a model trained without turns (--rot90 0) averages the four flips only
    assert tta_mode(False, 0.75) is None and tta_mode(True, 0.75) == 'dihedral' and tta_mode(True, 0.0) == 'flips'
    flips = dihedral_views(images, turns=False)
    assert len(flips) == 4 and all(any(torch.equal(f, v) for v in views) for f in flips)
    flipped, _ = predict_probs(model, loader(images), dev, tta='flips')
    expected = torch.stack([model(v).softmax(-1) for v in flips]).mean(0).detach().numpy()
    assert np.allclose(flipped, expected, atol=1e-6) and not np.allclose(flipped, tta, atol=1e-3)
    mirrored, _ = predict_probs(model, loader(images.flip(-2)), dev, tta='flips')
    assert np.allclose(mirrored, flipped, atol=1e-5)


def test_benchmark_window_leaves_warmup_out():
    import time
    from torch.utils.data import DataLoader, TensorDataset
    from turns import SteadyWindow
    loader = DataLoader(TensorDataset(torch.zeros(20, 1)), batch_size=4, drop_last=True)
    window = SteadyWindow(loader, warmup=2, device=torch.device('cpu'))
    assert len(window) == 5 and window.batch_size == 4
    for i, _ in enumerate(window):
        time.sleep(0.3 if i < 2 else 0.02)  # slow warm-up steps, then 3 fast timed ones
    rate = window.images_per_second(3)
    assert len(window.turns) == 1  # no turns asked for: one window
    assert 3 * 4 / (3 * 0.02 + 0.05) < rate <= 3 * 4 / (3 * 0.02)  # the 0.6 s of warm-up are not in the window
    assert 0 <= window.loader_share() < 0.5


BENCH_CHILD = """
import json, sys, time
if sys.argv[1] == 'fail':
    sys.exit('error: no images here')
import torch
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {root!r})
from turns import Gate, SteadyWindow
gate = Gate(int(sys.argv[sys.argv.index('--report_fd') + 1]))
window = SteadyWindow(DataLoader(TensorDataset(torch.zeros(7, 1))), 1, torch.device('cpu'), 2, gate)
spans = []
for i, _ in enumerate(window):
    start = time.time()
    time.sleep(float(sys.argv[1]))
    spans.append((start, time.time()))
gate.wait()
print(json.dumps({{'turns s': window.turns, 'spans': spans[1:]}}))
"""


def test_benchmark_pipelines_take_turns(tmp_path):
    import sys
    from turns import interleave, round_ratios
    from utils import DataError
    script = tmp_path / 'child.py'
    script.write_text(BENCH_CHILD.format(root=str(Path(__file__).resolve().parents[1])))
    child = lambda arg: [sys.executable, str(script), arg]
    out = interleave({'fast': child('0.02'), 'slow': child('0.06')}, rounds=3)  # 7 batches: 1 warm-up, 3 turns of 2
    fast, slow = out['fast'], out['slow']
    assert len(fast['turns s']) == len(slow['turns s']) == 3 and len(fast['spans']) == 6
    assert all(2.0 < r < 3.5 for r in round_ratios(fast['turns s'], slow['turns s']))  # 0.12 s against 0.04 s
    # never both at once, and the order alternates: fast, slow | slow, fast | fast, slow
    turns = sorted([(s[0][0], s[1][1], 'fast') for s in zip(fast['spans'][::2], fast['spans'][1::2])] +
                   [(s[0][0], s[1][1], 'slow') for s in zip(slow['spans'][::2], slow['spans'][1::2])])
    assert all(a[1] <= b[0] for a, b in zip(turns, turns[1:]))
    assert [t[2] for t in turns] == ['fast', 'slow', 'slow', 'fast', 'fast', 'slow']
    with pytest.raises(DataError, match='^broken pipeline: no images here$'):
        interleave({'broken': child('fail'), 'fast': child('0.02')}, rounds=3)  # the second never starts
    with pytest.raises(RuntimeError, match='^fast pipeline ended before its "turn" report \\(as one does whose loader'):
        interleave({'fast': child('0.02')}, rounds=4)  # 7 batches hold 3 turns of 2, not 4


def test_benchmark_window_longer_than_the_training_list(elpv_small):
    # a fast device's window (warm-up + timed steps) can ask for more batches than the split holds: the list is
    # taken again from its start, so each pipeline gets all its steps (else timm's one-epoch loader ran out)
    import benchmark
    opts = benchmark.get_args_parser().parse_args(['--data_path', str(elpv_small), '--test_val_ratio', '0.25', '0.25',
                                                   '--batch_size', '4', '--steps', '10', '--warmup', '2'])
    splits, frame = benchmark.training_images(opts, benchmark.pipeline_args(opts, 'timm'))
    train = splits['train']
    assert len(train) < 48 and len(frame) == 48 and list(frame.index) == list(range(48))
    assert list(frame['path']) == [train['path'].iloc[i % len(train)] for i in range(48)]
    opts.steps = 1  # a short window keeps the list's first images
    assert list(benchmark.training_images(opts, benchmark.pipeline_args(opts, 'tuned'))[1]['path']) == \
        list(train['path'].iloc[:12])


def test_forged_cache_file_never_runs_and_is_rebuilt(elpv_small, tmp_path, caplog):
    import pickle
    frame = load_splits([elpv_small], (0.25, 0.25), 0)['train'].iloc[:3]
    side = cache_side(32, 1.0)
    path = tmp_path / 'cache' / 'images.safetensors'
    marker = tmp_path / 'executed'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path.parent.mkdir()
    path.write_bytes(pickle.dumps(Payload()))  # a crafted file where the cache belongs
    with caplog.at_level(logging.WARNING):
        ds = DefectDataset(frame, build_transform(False, args_for()), cache=ImageCache(side, path))
    assert not marker.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'unreadable image cache' in warnings[0] and '\n' not in warnings[0]
    assert all(img is not None for img in ds.cached)
    again = ImageCache(side, path)  # rebuilt as a valid file
    assert len(again.entries) == 3 and all(v[1].dtype == np.uint8 for v in again.entries.values())
    # an index that points at a missing array is refused the same way
    from safetensors.numpy import save
    path.write_bytes(save({'i0': np.zeros((2, 2), np.uint8)}, metadata={'side': str(side), 'index': json.dumps(
        [{'path': 'x.png', 'window': None, 'size': 1, 'mtime_ns': 1, 'array': 'i9'}])}))
    assert ImageCache(side, path).entries == {}
