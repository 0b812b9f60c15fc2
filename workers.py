"""Data-loader workers chosen per machine: ``--num_workers -1`` (the default) when training or pretraining.

On a CPU the training step already keeps every core busy (torch's intra-op threads), so a loader worker does not
run beside it for free: it takes turns with the step's threads, and each parallel region of the step waits for its
slowest thread. On a 2-core Intel Xeon, FCMAE pretraining (128 px, batch 32) ran 27.6 s an epoch with one worker and
23.1 s with none (six runs in alternating order). Whether a worker pays depends on the machine, on how long a batch
takes to load and on the step, so it is measured: each candidate (the cores per process minus one, and none) loads
real batches of the training set and runs forward+backward steps on them with the run's model, precision and memory
format (eagerly), timed from the loader's start (a worker starts again each epoch, and its start counts); the
candidates take turns, so a machine that speeds up or slows down favours none. The epoch each predicts (first batch
+ the rest at the median step) decides, and the answer is remembered beside the precision choice per machine, torch
version, model, input size, batch, precision and the training transform. The chosen count serves the validation
and test loaders of the run too. On CUDA (the step runs on the GPU), under torchrun, in runs too short for the
probe to pay, and with one core, the default stands without a probe: ``runtime.default_workers``.
"""
import hashlib
import logging
import random
import re
import time

import numpy as np
import torch

from distributed import is_distributed
from precision import cache_path, probe_key, read_cache, remember, settings_label, train_step

log = logging.getLogger('workers')
PROBE_BATCHES = 4  # timed batches per candidate and round, after the one that starts the loader
PROBE_ROUNDS = 2  # the candidates take turns this many times
MIN_RUN_FACTOR = 10  # probe only runs of at least this many times the probe's own steps


def transform_id(dataset):
    """A short stable name (10 hex digits) of what loading one sample costs: the dataset's transform (its repr,
    addresses dropped) and whether decoded images come from a cache."""
    text = re.sub(r' at 0x[0-9a-f]+', '', ' '.join(repr(getattr(dataset, 'transform', None)).split()))
    text += f' cache={getattr(dataset, "cache", None) is not None}'
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def workers_key(args, settings, dataset, counts):
    """The key a worker choice is remembered under: the precision probe's key, the precision label, the candidate
    counts and ``transform_id``."""
    return (f'{probe_key(settings.device, args)} | {settings_label(settings)} | workers '
            f'{",".join(map(str, counts))} | {transform_id(dataset)}')


def time_loader(model, settings, loader, batches):
    """Seconds of the first batch (from starting the loader: worker start-up, loading and its step) and the median
    seconds of the next ``batches`` (waiting for each and its step), for ``loader``'s batches of (float32 images
    [B, C, H, W], ...) or None (all skipped; not timed)."""
    times, t0 = [], time.perf_counter()
    it = iter(loader)
    try:
        for batch in it:
            if batch is not None:
                train_step(model, settings, settings.inputs(batch[0]))
            t = time.perf_counter()
            times.append(t - t0)
            t0 = t
            if len(times) > batches:
                break
    finally:
        del it  # its workers stop
    rest = sorted(times[1:])
    return times[0], (rest[len(rest) // 2] if rest else times[0])


def probe_workers(settings, build, make_loader, counts, steps_per_epoch):
    """Predicted seconds an epoch for each worker count in ``counts``, measured (see the module docstring); the RNG
    states of torch, numpy and random are restored after.

    Args:
        settings: ``engine.DeviceSettings`` of the run. build: callable returning a fresh model (a classifier, or an
            FCMAE whose forward returns its loss first). make_loader: callable n -> the training DataLoader with
            ``n`` workers. counts: worker counts to compare. steps_per_epoch: int.

    Returns:
        dict count -> seconds (float): first batch + (steps_per_epoch - 1) x the median later batch.
    """
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            model = build().train()
            settings.prepare(model)
            time_loader(model, settings, make_loader(0), 0)  # warms the step up
            first, rest = {n: [] for n in counts}, {n: [] for n in counts}
            for _ in range(PROBE_ROUNDS):
                for n in counts:
                    f, r = time_loader(model, settings, make_loader(n), PROBE_BATCHES)
                    first[n].append(f)
                    rest[n].append(r)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return {n: round(float(np.median(first[n]) + (steps_per_epoch - 1) * np.median(rest[n])), 2) for n in counts}


def choose_workers(args, settings, build, make_loader, steps_per_epoch, epochs, default):
    """The loader workers of a training run: ``args.num_workers`` when given (>= 0), else measured and remembered
    (``probe_workers``) on a CPU, else ``default``.

    Args:
        args: flags (num_workers, model, input_size, batch_size, in_chans, pretrain). settings:
            ``engine.DeviceSettings`` of the run. build, make_loader: see ``probe_workers``; ``make_loader(n)``'s
            dataset names the transform in the remembered key. steps_per_epoch, epochs: ints (the run's length).
        default: the workers without a probe (``runtime.default_workers``).

    Returns:
        int: the worker count.
    """
    if args.num_workers >= 0:
        return args.num_workers
    counts = [default, 0] if default > 0 else [0]
    probe_steps = (1 + PROBE_ROUNDS * len(counts) * (PROBE_BATCHES + 1))
    if settings.device.type != 'cpu' or is_distributed() or len(counts) == 1 or \
            steps_per_epoch * epochs < MIN_RUN_FACTOR * probe_steps:
        return default
    key = workers_key(args, settings, make_loader(0).dataset, counts)
    epoch_s = read_cache(cache_path()).get(key)
    if isinstance(epoch_s, dict) and set(epoch_s) == set(map(str, counts)) and \
            all(isinstance(t, (int, float)) and t > 0 for t in epoch_s.values()):
        epoch_s = {int(n): t for n, t in epoch_s.items()}
        source = f'from {cache_path()}'
    else:
        epoch_s = probe_workers(settings, build, make_loader, counts, steps_per_epoch)
        remember(key, {str(n): t for n, t in epoch_s.items()}, 'the loader worker choice')
        source = f'measured ({PROBE_ROUNDS} x {PROBE_BATCHES + 1} batches each)'
    workers = min(counts, key=lambda n: (epoch_s[n], n))
    log.info(f'loader workers {source}, predicted seconds an epoch: '
             + ', '.join(f'{n}: {t:g}' for n, t in epoch_s.items()) + f' -> {workers}')
    return workers
