"""Precision and memory format chosen per machine: ``--use_amp``, ``--channels_last`` and ``--depthwise_fp32`` auto.

Whether bf16 autocast and channels_last make a ConvNeXt training step faster depends on the processor: bf16 trains
1.6x faster than fp32 on an AMD EPYC, 0.62x as fast on an Intel Xeon with AVX512-BF16 but no AMX, 1.09x as fast on
one with AMX, and 11-14x slower on an AMD EPYC without AVX512 (no bf16 arithmetic); on the one with AMX, bf16 with
the depthwise convolutions alone in fp32 channels_last (``models.depthwise``) beat all four. So on a CPU the choice is
measured: a few forward+backward steps of the actual model at the actual input size and batch, for each candidate
the flags leave open, and the fastest wins. The answer is remembered per machine, torch version,
model, input size, batch and channels in a JSON file (``$CONVNEXT_PRECISION_CACHE``, default
``~/.cache/convnext_softlabel/precision.json``), so later runs skip the probe. Evaluation and prediction
(``main.py --eval/--pred``, ``predict.Predictor``, ``serve.py``) are decided by forward passes alone, under
``torch.inference_mode`` at the evaluation batch, and remembered apart. On CUDA no probe is needed: autocast
in bf16 where the GPU supports it, else fp16 with a gradient scaler, and channels_last.

``--compile auto`` is decided the same way, over the whole run: ``torch.compile`` costs its compile time once and
then (perhaps) saves time on every step, so the run compiles when compile seconds + steps x compiled step seconds
are below steps x eager step seconds, both measured on the machine in the run's precision and remembered beside
the precision choice. A run too short for any compilation to pay off (eager total under ``MIN_COMPILE_SECONDS``)
stays eager without a probe. When a training run leaves both the precision and compiling to auto, ``choose_run``
compares the candidates by their whole run, compiled or not (compiling speeds some up and slows others down).
"""
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from distributed import broadcast_object, is_main_process
from engine import EVAL_BATCH_FACTOR, DeviceSettings
from models import resnet_roadmap
from models.depthwise import WGRAD_CHOICES
from utils import DataError, atomic_write_json

log = logging.getLogger('precision')
PROBE_STEPS = 3  # timed steps per candidate, after one untimed warm-up step
GIVE_UP_FACTOR = 3.0  # a candidate whose warm-up step is this many times the best median is not timed on
MIN_COMPILE_SECONDS = 30.0  # no torch.compile of a ConvNeXt finished faster than this here: shorter runs stay eager
SEARCH_SHARE = 0.1  # compile timings of further candidates may take this share of a run's eager seconds


def cache_path():
    """The JSON file of remembered choices (``$CONVNEXT_PRECISION_CACHE`` or the user's cache folder)."""
    default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'convnext_softlabel' / 'precision.json'
    return Path(os.environ.get('CONVNEXT_PRECISION_CACHE', default))


def machine_name(device):
    """A name for the machine's compute: the GPU's name and capability, or the CPU model, its bf16/AMX flags and the
    number of cores this process may use."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} sm{"".join(map(str, torch.cuda.get_device_capability(device)))}'
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name') and ':' in line:
                model = line.split(':', 1)[1].strip()
            elif line.startswith('flags') and ':' in line:
                flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    extras = '+'.join(sorted(flags & {'avx512_bf16', 'amx_bf16', 'amx_tile', 'avx512f'}))
    return f'{model} [{extras or "no avx512"}] x{cores} threads {torch.get_num_threads()}'


def probe_batch_size(args, inference=False):
    """The batch the probe times: the training batch, or for ``inference`` the evaluation loaders' batch
    (``EVAL_BATCH_FACTOR`` x the training batch)."""
    return args.batch_size * EVAL_BATCH_FACTOR if inference else args.batch_size


def probe_key(device, args, inference=False):
    """The key a choice is remembered under: machine, torch version, model (with its norm layer and roadmap flags),
    input size, batch and channels; for ``inference`` (evaluation and prediction) the evaluation batch
    (``EVAL_BATCH_FACTOR`` x the training batch) and the word ``inference``."""
    model = f'fcmae {args.model}' if getattr(args, 'pretrain', False) else args.model
    if getattr(args, 'norm_layer', 'layernorm') != 'layernorm':
        model += f' {args.norm_layer}'
    if args.model == 'resnet':  # the roadmap's steps are different networks
        model += ' ' + ' '.join(f'{k}={getattr(args, k, None)}' for k in resnet_roadmap.ROADMAP_FLAGS)
    # a training step's time depends on how the depthwise weight gradient is computed (models.depthwise); the
    # keys remembered before --depthwise_wgrad existed measured PyTorch's own, which 'native' still names
    wgrad = not inference and device.type == 'cpu' and depthwise_wgrad(args) == 'forward_conv'
    return (f'{machine_name(device)} | torch {torch.__version__} | {model} | {args.input_size}px | '
            f'batch {probe_batch_size(args, inference)} | {args.in_chans}ch' + (' | inference' if inference else '')
            + (' | depthwise wgrad forward_conv' if wgrad else ''))


def depthwise_wgrad(args):
    """``args.depthwise_wgrad``: 'forward_conv' (also when missing, as in the arguments of runs from before the
    flag) or 'native'.

    Raises:
        DataError: another value.
    """
    value = getattr(args, 'depthwise_wgrad', 'forward_conv')
    if value not in WGRAD_CHOICES:
        raise DataError(f'--depthwise_wgrad must be one of {", ".join(WGRAD_CHOICES)}, got {value}')
    return value


def read_cache(path):
    """The remembered choices (dict key -> entry); an unreadable or malformed file counts as empty (JSON only)."""
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def train_step(model, settings, x):
    """One forward+backward pass of ``model`` on ``x`` (float32 tensor [B, C, H, W] already on the device in its
    memory format, see ``DeviceSettings.inputs``) under the autocast of ``settings``, the gradients dropped after:
    the work of a training step without an optimizer. The loss is FCMAE's own (the first item of a tuple output) or
    a stand-in for a classifier (log-sum-exp of the logits)."""
    with settings.autocast():
        out = model(x)
    loss = out[0] if isinstance(out, tuple) else out.float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def remember(key, entry, what):
    """Add ``entry`` under ``key`` to the remembered choices in ``cache_path()`` (an atomic rewrite); a file that
    cannot be written is logged (``what``: the choice it was, e.g. ``the precision choice``) and the run goes on."""
    path = cache_path()
    try:
        atomic_write_json({**read_cache(path), key: entry}, path)
    except OSError as e:
        log.warning(f'{path}: cannot remember {what} ({e.strerror})')


def time_step(model, settings, batch, steps=PROBE_STEPS, give_up_after=None, train=True):
    """Median seconds of one forward+backward step of ``model`` on random inputs with ``settings`` (0.0 when
    ``steps`` is 0: the untimed warm-up step only); with ``train=False`` of one forward pass under
    ``torch.inference_mode`` (what evaluation and prediction run).

    Args:
        model: nn.Module (in training mode for ``train``, else in eval mode). settings: ``engine.DeviceSettings``.
        batch: float32 tensor [B, C, H, W].
        give_up_after: seconds; when the warm-up step alone takes longer, its time is returned and no step is timed
            (a candidate that slow cannot win: bf16 without native support runs 10-15x slower than fp32).
    """
    settings.prepare(model)
    x = settings.inputs(batch)
    times = []
    for i in range(steps + 1):
        if settings.device.type == 'cuda':
            torch.cuda.synchronize(settings.device)
        t0 = time.perf_counter()
        if train:
            train_step(model, settings, x)
        else:
            with torch.inference_mode(), settings.autocast():
                model(x)
        if settings.device.type == 'cuda':
            torch.cuda.synchronize(settings.device)
        elapsed = time.perf_counter() - t0
        if i:  # the first step warms up allocators and kernels
            times.append(elapsed)
        elif give_up_after is not None and elapsed > give_up_after:
            return elapsed
    return sorted(times)[len(times) // 2] if times else 0.0


CANDIDATES = {  # label -> (use_amp, channels_last, depthwise_fp32)
    'fp32': (False, False, False), 'fp32 channels_last': (False, True, False),
    'bf16': (True, False, False), 'bf16 channels_last': (True, True, False),
    'bf16 depthwise fp32': (True, False, True), 'bf16 channels_last depthwise fp32': (True, True, True)}


def candidate_settings(device, label, wgrad='forward_conv'):
    """``engine.DeviceSettings`` of the candidate ``label`` of ``CANDIDATES`` on ``device`` (CPU autocast: bf16),
    the depthwise weight gradient computed as ``wgrad`` says ('forward_conv' or 'native', ``models.depthwise``)."""
    use_amp, channels_last, depthwise_fp32 = CANDIDATES[label]
    return DeviceSettings(device, use_amp, 'bfloat16', channels_last, depthwise_fp32, wgrad)


def probe(args, device, build, inference=False):
    """Time every candidate of ``CANDIDATES`` on a fresh model from ``build()``; the RNG states are restored after.
    A candidate whose warm-up step alone takes over ``GIVE_UP_FACTOR`` x the fastest median so far is not timed
    further: its warm-up time stands for it. With ``inference`` the model is in eval mode and only forward passes
    of the evaluation batch (``EVAL_BATCH_FACTOR`` x ``args.batch_size``) are timed.

    Returns:
        dict label -> median seconds per forward+backward step, or per forward pass for ``inference`` (or the
        warm-up step's seconds, see above).
    """
    times = {}
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        model = build().train(not inference)
        batch = torch.randn(probe_batch_size(args, inference), args.in_chans, args.input_size, args.input_size)
        for label in CANDIDATES:
            best = min(times.values(), default=None)
            times[label] = round(time_step(model, candidate_settings(device, label, depthwise_wgrad(args)), batch,
                                           give_up_after=None if best is None else GIVE_UP_FACTOR * best,
                                           train=not inference), 4)
    return times


def requested(args):
    """The precision flags as given: (use_amp, channels_last, depthwise_fp32), each True, False or 'auto' (a missing
    depthwise_fp32 counts as 'auto'; without autocast it is False: the convolutions are fp32 already).

    Raises:
        DataError: a value other than True, False or 'auto', or --depthwise_fp32 True with --use_amp False.
    """
    amp, cl, dw = args.use_amp, args.channels_last, getattr(args, 'depthwise_fp32', 'auto')
    for name, value in (('use_amp', amp), ('channels_last', cl), ('depthwise_fp32', dw)):
        if value not in (True, False, 'auto'):
            raise DataError(f'--{name} must be True, False or auto, got {value}')
    if amp is False and dw is True:
        raise DataError('--depthwise_fp32 True keeps depthwise convolutions out of autocast: it needs --use_amp True '
                        'or auto')
    return amp, cl, (False if amp is False else dw)


def allowed_candidates(wanted):
    """Labels of ``CANDIDATES`` that the flags ``wanted`` (use_amp, channels_last, depthwise_fp32: bool or 'auto')
    leave open."""
    return [label for label, flags in CANDIDATES.items()
            if all(want in ('auto', value) for want, value in zip(wanted, flags))]


def step_times(args, device, build, inference=False):
    """Seconds per step of every candidate (dict label -> seconds): remembered in ``cache_path()`` or measured by
    ``probe`` and remembered, on rank 0; every process of a torchrun job gets rank 0's answer."""
    key, path, step_s = probe_key(device, args, inference), cache_path(), None
    if is_main_process():
        step_s = read_cache(path).get(key)
        if isinstance(step_s, dict) and set(step_s) == set(CANDIDATES) and \
                all(isinstance(t, (int, float)) and t > 0 for t in step_s.values()):
            log.info(f'precision from {path}: measured seconds per step {step_s}')
        else:
            step_s = probe(args, device, build, inference)
            log.info(f'precision probe ({PROBE_STEPS} {"forward passes" if inference else "forward+backward steps"} '
                     f'each), seconds per step: {step_s}')
            remember(key, step_s, 'the precision choice')
    return broadcast_object(step_s)


def choose(args, device, build, inference=False):
    """Resolve ``--use_amp``, ``--channels_last`` and ``--depthwise_fp32`` set to auto for this machine; explicit
    True/False win. ``--depthwise_fp32 auto`` is False without autocast (the convolutions are fp32 already) and on
    CUDA.

    Args:
        args: argparse.Namespace with use_amp, channels_last and depthwise_fp32 (bool or 'auto'; a missing
            depthwise_fp32 counts as 'auto'), amp_dtype, model, input_size, batch_size, in_chans. device:
            torch.device. build: callable returning a fresh model to probe.
        inference: choose for evaluation and prediction (forward passes of the evaluation batch, see ``probe``),
            remembered apart from the training choice.

    Returns:
        (use_amp: bool, channels_last: bool, depthwise_fp32: bool, amp_dtype: str).

    Raises:
        DataError: a value other than True, False or 'auto', or --depthwise_fp32 True with --use_amp False.
    """
    (amp, cl, dw), amp_dtype = requested(args), args.amp_dtype
    if device.type == 'cuda':
        if amp == 'auto' and amp_dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
            amp_dtype = 'float16'
        return (True if amp == 'auto' else amp), (True if cl == 'auto' else cl), (dw is True), amp_dtype
    if 'auto' not in (amp, cl, dw):
        return amp, cl, dw, amp_dtype
    step_s = step_times(args, device, build, inference)
    use_amp, channels_last, depthwise_fp32 = CANDIDATES[min(allowed_candidates((amp, cl, dw)), key=step_s.get)]
    log.info(f'--use_amp {use_amp} --channels_last {channels_last} --depthwise_fp32 {depthwise_fp32} on '
             f'{machine_name(device)}')
    return use_amp, channels_last, depthwise_fp32, amp_dtype


def settings_label(settings):
    """The name of a precision and memory format as ``CANDIDATES`` names them, e.g. ``bf16 channels_last`` or
    ``bf16 depthwise fp32`` (``engine.DeviceSettings``)."""
    fp16 = settings.device.type == 'cuda' and settings.amp_dtype == 'float16'  # autocast is bf16 on the CPU
    precision = ('fp16' if fp16 else 'bf16') if settings.use_amp else 'fp32'
    return precision + (' channels_last' if settings.channels_last else '') + \
        (' depthwise fp32' if settings.use_amp and settings.depthwise_fp32 else '')


def compile_error(e):
    """One line naming a compile failure: ``ClassName: first line of the message`` (at most 160 characters)."""
    return f'{e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'


def probe_compile(build, settings, batch):
    """Time ``torch.compile`` of a fresh model: the compile seconds and the step seconds eager and compiled.

    Args:
        build: callable returning a fresh nn.Module. settings: ``engine.DeviceSettings``. batch: float32 tensor
            [B, C, H, W] on the CPU.

    Returns:
        dict ``eager``, ``compiled`` (median seconds per forward+backward step), ``compile`` (seconds the first
        compiled step took beyond a compiled step); or ``{'error': message}`` when compiling fails.
    """
    eager = build().train()
    eager_s = time_step(eager, settings, batch)
    compiled = torch.compile(build().train(), dynamic=False)  # as runtime.CompiledModule compiles
    try:
        t0 = time.perf_counter()
        time_step(compiled, settings, batch, steps=0)  # the untimed warm-up step compiles forward and backward
        first_s = time.perf_counter() - t0
        compiled_s = time_step(compiled, settings, batch)
    except Exception as e:  # compiler back ends raise many kinds of errors
        return {'error': compile_error(e)}
    return {'eager': round(eager_s, 4), 'compiled': round(compiled_s, 4),
            'compile': round(max(first_s - compiled_s, 0.0), 2)}


def valid_compile_entry(entry):
    """Whether a remembered compile timing is usable: ``{'error': str}`` or non-negative numbers for ``eager``,
    ``compiled`` and ``compile``."""
    if not isinstance(entry, dict):
        return False
    if 'error' in entry:
        return isinstance(entry['error'], str)
    return all(isinstance(entry.get(k), (int, float)) and entry[k] >= 0 for k in ('eager', 'compiled', 'compile'))


def compile_key(args, device, label):
    """The key a compile timing is remembered under: the precision probe's key, the candidate's label, ``compile``."""
    return f'{probe_key(device, args)} | {label} | compile'


def compile_timing(args, settings, build, batch, measure=True):
    """The ``probe_compile`` entry of ``settings`` remembered in ``cache_path()``, or (``measure``) measured now and
    remembered.

    Returns:
        (entry: dict, see ``probe_compile``, or None when none is remembered and ``measure`` is False; seconds spent
        measuring it: float, 0.0 when remembered).
    """
    label, path = settings_label(settings), cache_path()
    key = compile_key(args, settings.device, label)
    entry = read_cache(path).get(key)
    if valid_compile_entry(entry) or not measure:
        return (entry if valid_compile_entry(entry) else None), 0.0
    log.info(f'timing torch.compile of {args.model} ({label}) once for this machine')
    t0 = time.perf_counter()
    entry = probe_compile(build, settings, batch)
    remember(key, entry, 'the compile choice')
    return entry, time.perf_counter() - t0


def run_seconds(entry, eager_s, steps):
    """Seconds of a run of ``steps`` steps, eager and compiled, from a ``probe_compile`` entry (its eager and
    compiled steps, timed one after the other; the compiled run adds the compile seconds), or, for an entry
    without timings, from ``eager_s`` (the precision probe's seconds per step).

    Returns:
        (eager seconds: float, compiled seconds: float, inf when compiling failed).
    """
    if 'error' in entry:
        return steps * eager_s, float('inf')
    return steps * entry['eager'], entry['compile'] + steps * entry['compiled']


def choose_compile(args, settings, build, steps):
    """Resolve ``--compile auto`` for a run of ``steps`` forward+backward steps in ``settings``; explicit True/False
    win.

    The eager step time comes from the precision probe's record (or 3 timed steps); when ``steps`` x that is under
    ``MIN_COMPILE_SECONDS`` the run stays eager. Otherwise ``compile_timing`` reads or measures ``probe_compile``
    (on rank 0, inside ``torch.random.fork_rng``), and the run compiles when ``compile + steps x compiled <
    steps x eager``.

    Args:
        args: argparse.Namespace with compile (bool or 'auto'), model, input_size, batch_size, in_chans.
        settings: ``engine.DeviceSettings`` the run uses. build: callable returning a fresh model.
        steps: int, forward+backward steps of the whole run (epochs x steps per epoch).

    Returns:
        bool: whether to compile.

    Raises:
        DataError: a value other than True, False or 'auto'.
    """
    if args.compile not in (True, False, 'auto'):
        raise DataError(f'--compile must be True, False or auto, got {args.compile}')
    if args.compile != 'auto':
        return args.compile
    device, label, decision = settings.device, settings_label(settings), None
    if is_main_process():
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
            batch = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size)
            remembered = read_cache(cache_path()).get(probe_key(device, args))
            eager_s = remembered.get(label) if isinstance(remembered, dict) else None
            if not (isinstance(eager_s, (int, float)) and eager_s > 0):
                eager_s = time_step(build().train(), settings, batch)
            if steps * eager_s < MIN_COMPILE_SECONDS:
                log.info(f'--compile False: {steps} steps x {eager_s:.3f} s eager is too short to gain from compiling')
                decision = False
            else:
                entry, _ = compile_timing(args, settings, build, batch)
                if 'error' in entry:
                    log.info(f'--compile False: torch.compile fails here ({entry["error"]})')
                    decision = False
                else:
                    eager_total, compiled_total = run_seconds(entry, eager_s, steps)
                    decision = compiled_total < eager_total
                    log.info(f'--compile {decision}: {steps} steps eager {eager_total / 60:.1f} min, compiled '
                             f'{compiled_total / 60:.1f} min ({entry["compile"]:.0f} s to compile, '
                             f'{entry["eager"]:.3f} -> {entry["compiled"]:.3f} s per step)')
    return broadcast_object(decision)


def search_compiled(args, device, build, steps, ranked, step_s):
    """The fastest (label, compile) for a run of ``steps`` steps among the candidates ``ranked`` (labels, fastest
    eager first; ``step_s``: their eager seconds per step), on rank 0.

    Each candidate's compile timing is read from the cache file or measured (``compile_timing``); measuring goes on
    down the ranking while the seconds spent measuring stay within ``SEARCH_SHARE`` of the run's eager time (the
    first candidate is always timed), and remembered timings are always used, so a search cut short continues in the
    next run of the same model, size and batch. The first candidate eager (the precision probe's time) is the run to
    beat; a candidate whose compile timing is unknown counts as eager, so it cannot beat the first.
    """
    allowance, spent, cost, summary = SEARCH_SHARE * steps * step_s[ranked[0]], 0.0, 0.0, []
    best = (steps * step_s[ranked[0]], ranked[0], False)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        batch = torch.randn(args.batch_size, args.in_chans, args.input_size, args.input_size)
        for i, label in enumerate(ranked):
            measure = not i or spent + cost <= allowance
            settings = candidate_settings(device, label, depthwise_wgrad(args))
            entry, seconds = compile_timing(args, settings, build, batch, measure)
            if entry is None:
                summary.append(f'{label}: compile not timed')  # slower eager than the first: it cannot win eager
                continue
            spent, cost = spent + seconds, seconds or cost
            eager_total, compiled_total = run_seconds(entry, step_s[label], steps)
            best = min(best, (eager_total, label, False), (compiled_total, label, True))
            summary.append(f'{label}: eager {eager_total / 60:.1f} min, compiled {compiled_total / 60:.1f} min')
    log.info(f'precision and --compile for {steps} steps: {"; ".join(summary)}')
    return best[1], best[2]


def choose_run(args, device, build, steps, max_seconds=None):
    """Resolve the precision flags (``choose``) and ``--compile auto`` (``choose_compile``) together for a training
    run of ``steps`` forward+backward steps: compiling speeds some candidates up and slows others down (on an
    Intel Xeon with AMX, FCMAE pretraining of convnextv2_atto was fastest eager as bf16 with fp32 depthwise
    convolutions but compiled as the same in channels_last, 0.35 against 0.63 s a step), so when both are auto on
    a CPU the candidates are compared by their whole run (``search_compiled``). Otherwise the precision is chosen
    first and compiling decided for it.

    Args:
        args: argparse.Namespace as ``choose`` and ``choose_compile`` take it. device: torch.device. build: callable
            returning a fresh model. steps: int, forward+backward steps of the whole run.
        max_seconds: the run's time limit in seconds (``--time_budget``), or None: the search counts the steps
            that fit in it at the fastest eager speed when they are fewer.

    Returns:
        (use_amp: bool, channels_last: bool, depthwise_fp32: bool, amp_dtype: str, compile: bool).

    Raises:
        DataError: as ``choose`` and ``choose_compile``.
    """
    wanted = requested(args)
    if args.compile not in (True, False, 'auto'):
        raise DataError(f'--compile must be True, False or auto, got {args.compile}')
    if args.compile != 'auto' or device.type == 'cuda' or 'auto' not in wanted:
        use_amp, channels_last, depthwise_fp32, amp_dtype = choose(args, device, build)
        settings = DeviceSettings(device, use_amp, amp_dtype, channels_last, depthwise_fp32, depthwise_wgrad(args))
        return use_amp, channels_last, depthwise_fp32, amp_dtype, choose_compile(args, settings, build, steps)
    step_s, amp_dtype = step_times(args, device, build), args.amp_dtype
    ranked = sorted(allowed_candidates(wanted), key=step_s.get)
    if max_seconds:
        steps = min(steps, max(1, int(max_seconds / step_s[ranked[0]])))
    if steps * step_s[ranked[0]] < MIN_COMPILE_SECONDS:
        log.info(f'--compile False: {steps} steps x {step_s[ranked[0]]:.3f} s eager is too short to gain from '
                 'compiling')
        label, compiled = ranked[0], False
    else:
        choice = search_compiled(args, device, build, steps, ranked, step_s) if is_main_process() else None
        label, compiled = broadcast_object(choice)  # every process of a torchrun job runs as rank 0 decided
    use_amp, channels_last, depthwise_fp32 = CANDIDATES[label]
    log.info(f'--use_amp {use_amp} --channels_last {channels_last} --depthwise_fp32 {depthwise_fp32} --compile '
             f'{compiled} on {machine_name(device)}')
    return use_amp, channels_last, depthwise_fp32, amp_dtype, compiled
