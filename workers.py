"""Data-loader workers chosen per machine: ``--num_workers -1`` (the default) when training or pretraining.

On a CPU the training step already keeps every core busy (torch's intra-op threads), so a loader worker does not run
beside it for free: it takes turns with the step's threads, and each parallel region of the step waits for its
slowest thread. On a 2-core Intel Xeon, FCMAE pretraining (128 px, batch 32) ran 27.6 s an epoch with one worker and
23.1 s with none (six runs in alternating order). Whether a worker pays depends on the machine, on how long a batch
takes to load and on the step, so it is measured: each candidate (the cores per process minus one, and none) loads
real batches of the training set and runs forward+backward steps on them with the run's model, precision and memory
format, the candidates' loaders running at once and their batches taking turns (``probe_workers``). The epoch each
predicts (the first batch, which counts a worker's start as every epoch does, + the rest at its step) decides, and
the answer is remembered beside the precision choice per machine, torch version, model, input size, batch, precision
and the training transform. The steps run eagerly even when the run compiles: a compiled step is shorter, but what a
worker adds to it or takes off it (the loading moved off the loop, against the turns it takes from the step's
threads) is about the same seconds, so the order of the candidates stays (for FCMAE pretraining on 2 cores, eager
and compiled probes both favoured none). The chosen count serves the validation and test
loaders of the run too. On CUDA (the step runs on the GPU), under torchrun, in runs too short for the probe to pay
or with an epoch too short for it, and with one core, the default stands without a probe:
``runtime.default_workers``.
"""
import hashlib
import logging
import re
import time

import numpy as np

from distributed import is_distributed
from precision import cache_path, probe_key, read_cache, remember, settings_label, train_step
from utils import rng_state, set_rng_state

log = logging.getLogger('workers')
PROBE_BATCHES = 10  # timed batches per candidate in turns, after the one that starts its loader
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
            f'{",".join(map(str, counts))} in turns | {transform_id(dataset)}')


def timed_step(model, settings, it):
    """Seconds to take the next batch of the iterator ``it`` (float32 images [B, C, H, W], ..., or None: all
    skipped, no step) and run a forward+backward step on it."""
    t0 = time.perf_counter()
    batch = next(it)
    if batch is not None:
        train_step(model, settings, settings.inputs(batch[0]))
    return time.perf_counter() - t0


def probe_workers(settings, build, make_loader, counts, steps_per_epoch):
    """Predicted seconds an epoch for each worker count in ``counts``, measured; the RNG states are restored after
    (``utils.rng_state``).

    One loader per count runs at once and their batches take turns, one step each: while one count's batch steps,
    another's worker has its batches loaded already and waits, so each step sees only its own loader's work, and
    a machine that speeds up or slows down moves all counts alike (the steps of one round are seconds apart). A
    count's step is the last count's median step + the median of their differences in each round: the differences
    vary less than the steps (measured for FCMAE pretraining on 2 cores, compiled, none against one worker, five
    probes of 12 rounds: one worker's medians 0.41-0.52 s a step, the paired differences +0.007 to +0.026 s, all
    five favouring none).

    Args:
        settings: ``engine.DeviceSettings`` of the run. build: callable returning a fresh model (a classifier, or an
            FCMAE whose forward returns its loss first). make_loader: callable n -> the training DataLoader with
            ``n`` workers and at least ``PROBE_BATCHES + 1`` batches. counts: worker counts to compare.
            steps_per_epoch: int.

    Returns:
        dict count -> seconds (float): the first batch (from starting the loader: worker start-up, loading and its
        step) + (steps_per_epoch - 1) x the count's step (waiting for a batch and its step, above).
    """
    states = rng_state()
    try:
        model = build().train()
        settings.prepare(model)
        timed_step(model, settings, iter(make_loader(0)))  # warms the step up
        first, rest, iters = {}, {n: [] for n in counts}, {}
        for n in counts:
            t0 = time.perf_counter()
            iters[n] = iter(make_loader(n))
            first[n] = timed_step(model, settings, iters[n]) + time.perf_counter() - t0
        for _ in range(PROBE_BATCHES):
            for n in counts:
                rest[n].append(timed_step(model, settings, iters[n]))
        del iters  # their workers stop
    finally:
        set_rng_state(states)
    base = counts[-1]  # each count's step: the median of the last count's + the median of the paired differences
    step = {n: float(np.median(rest[base]) + np.median(np.subtract(rest[n], rest[base]))) for n in counts}
    return {n: round(first[n] + (steps_per_epoch - 1) * step[n], 2) for n in counts}


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
    probe_steps = 1 + len(counts) * (PROBE_BATCHES + 1)
    if settings.device.type != 'cpu' or is_distributed() or len(counts) == 1 or steps_per_epoch <= PROBE_BATCHES \
            or steps_per_epoch * epochs < MIN_RUN_FACTOR * probe_steps:
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
        source = f'measured ({PROBE_BATCHES + 1} batches each, in turns)'
    workers = min(counts, key=lambda n: (epoch_s[n], n))
    log.info(f'loader workers {source}, predicted seconds an epoch: '
             + ', '.join(f'{n}: {t:g}' for n, t in epoch_s.items()) + f' -> {workers}')
    return workers
