"""Speed and memory benchmark of the training, evaluation and prediction pipelines (prints figures; not a test).

    python benchmark.py --data_path data/elpv --model convnext_atto --input_size 224 --batch_size 32 --peer timm
    python benchmark.py --data_path data/elpv --model convnext_atto --input_size 224 --batch_size 32 --compare True

For one model, input size and batch size it prints training images/s in steady state (the loader's worker start-up
and the warm-up steps lie outside the timed window), the loader's share of that time, evaluation and prediction-mode
images/s (files in, predictions.csv and sorted copies out), the evaluation images/s of the same model exported
to ONNX and run by onnxruntime on CPU (``onnx eval img/s``, tuned pipeline), peak resident memory, and the fraction
of the machine's measured GEMM peak the training reaches (model FLOPs per image x images/s; 3x the forward FLOPs that
torch's ``FlopCounterMode`` counts). Each pipeline runs in its own process:

- tuned: this project's pipeline as main.py runs it (decode-once cache, ``--use_amp``, ``--channels_last`` and
  ``--depthwise_fp32`` auto, ``--compile auto`` decided for a training of ``--epochs`` epochs of the split;
  compiling happens in the warm-up; torch's fused AdamW step, ``--opt_fused True``; freed memory reused,
  ``--reuse_freed_memory True``; on a CPU the depthwise weight gradient by the forward kernel,
  ``--depthwise_wgrad forward_conv``).
- plain (``--compare True``): no cache, fp32, contiguous memory, the per-parameter AdamW step (``--opt_fused False``),
  PyTorch's own depthwise backward (``--depthwise_wgrad native``).
- timm (``--peer timm``): a training loop built from timm's public pieces as timm's train.py builds it: timm's
  ImageFolder dataset and ``create_loader`` over the same training images, ``create_model``, ``create_optimizer_v2``,
  ``torch.autocast`` and channels_last as train.py applies them, cross-entropy. It runs in the precision the same
  probe picks for the model on this machine among those timm offers (``--depthwise_fp32 False``, ``--depthwise_wgrad
  native``).

The pipelines' processes take turns on the machine (``interleave``): each sets up and warms up alone, then the
``--steps`` timed steps of each run in ``--rounds`` turns, one process at a time, alternating (tuned, timm, timm,
tuned, ...), so that the speed of a shared machine, which drifts by tens of percent within minutes, falls on all
of them alike; then each runs its evaluation and prediction figures alone. A waiting process's loader worker may
still prepare its next batches (two at most) during another's turn. The speed ratios are the medians of the
rounds' ratios, printed with each round's; the last line is ``training speed vs timm: R.RRx``.
"""
import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import main as cli
import runtime
from datasets import load_splits
from engine import build_optimizer, predict_probs, train_one_epoch
from labels import LABELS
from models import build_model
from precision import settings_label
from preprocess_data import split_name
from softLabelLoss import SoftLabelLoss
from turns import Gate, SteadyWindow, interleave, round_ratios
from utils import DataError, run_cli, str2bool, str2bool_or_auto


def peak_rss_mib():
    """Peak resident memory of this process plus the largest of its finished children (DataLoader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def pipeline_args(opts, pipeline):
    """main.py flags of a pipeline ('tuned', 'plain' or 'timm': the timm peer uses the tuned precision choice)."""
    flags = ['--model', opts.model, '--input_size', str(opts.input_size), '--batch_size', str(opts.batch_size),
             '--num_workers', str(opts.num_workers), '--device', opts.device, '--data_path', opts.data_path,
             '--test_val_ratio', *map(str, opts.test_val_ratio), '--lr', '1e-3']
    if pipeline == 'plain':
        flags += ['--cache', 'none', '--use_amp', 'False', '--channels_last', 'False', '--opt_fused', 'False',
                  '--reuse_freed_memory', 'False', '--depthwise_wgrad', 'native']
    else:
        flags += ['--cache', 'memory', '--use_amp', 'auto', '--channels_last', 'auto', '--compile', str(opts.compile),
                  '--opt_fused', str(opts.opt_fused),
                  '--reuse_freed_memory', str(opts.reuse_freed_memory and pipeline == 'tuned')]
        # not choices timm's train.py has: its precision is probed with PyTorch's own depthwise convolutions
        flags += ['--depthwise_fp32', 'False', '--depthwise_wgrad', 'native'] if pipeline == 'timm' else []
    return cli.get_args_parser().parse_args(flags)


def train_flops_per_image(model, args, device):
    """FLOPs of one training step per image: 3x the forward FLOPs counted by ``torch.utils.flop_counter`` (backward
    costs twice the forward, the usual estimate; the counter's own backward count of grouped convolutions is too high
    to use)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, args.in_chans, args.input_size, args.input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / 2


def gemm_peak(device, bf16, n=2048, repeats=5):
    """Measured matrix-multiply throughput (FLOP/s) of the device in fp32 or bf16: the best of ``repeats`` n x n
    products after a warm-up."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float('inf')
    for i in range(repeats + 1):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def training_images(opts, args):
    """The split's lists and (warmup + steps) batches' worth of its training list, from its start: the list taken
    again from its first image as often as needed, so a fast device's longer window never runs out of images.

    Returns:
        (dict 'train'/'val'/'test' -> DataFrame, DataFrame of (warmup + steps) x batch_size rows).

    Raises:
        DataError: see ``datasets.load_splits``; an empty training split or one with unlabelled samples.
    """
    splits = load_splits([opts.data_path], args.test_val_ratio, runtime.split_seed(args))
    train = runtime.check_training_list(splits['train'], opts.data_path)
    rows = (opts.warmup + opts.steps) * args.batch_size
    return splits, train.iloc[[i % len(train) for i in range(rows)]].reset_index(drop=True)


def measure(opts, pipeline):
    """Figures of the tuned or plain pipeline: dict of images/s, loader share, GEMM-peak fraction, memory."""
    args = pipeline_args(opts, pipeline)
    splits, frame = training_images(opts, args)  # bad data is refused before the precision probe
    run_steps = opts.epochs * max(1, len(splits['train']) // args.batch_size)  # the training --compile auto is for
    dev = runtime.device_settings(args, steps=run_steps)  # precision and --compile
    cache = runtime.make_cache(args, len(frame) + len(splits['test'])) if pipeline == 'tuned' else None
    train_set = runtime.make_dataset(frame, args, True, cache)
    eval_set = runtime.make_dataset(splits['test'], args, False, cache)
    if pipeline == 'tuned':  # --num_workers -1 as main.py resolves it; plain keeps the cores-minus-one default
        runtime.settle_workers(args, dev, train_set, lambda: build_model(args), opts.epochs)
    model = build_model(args)
    flops = train_flops_per_image(model, args, torch.device('cpu'))
    run_model = runtime.prepare_model(model, args, dev)
    optimizer, lr_scheduler = build_optimizer(model, args, len(train_set) // args.batch_size)
    criterion = SoftLabelLoss(args.nb_classes).to(dev.device)
    gate = Gate(opts.report_fd)
    train_loader = runtime.make_loader(train_set, args, dev.device, True)
    loader = SteadyWindow(train_loader, opts.warmup, dev.device, opts.steps // opts.rounds, gate)
    train_one_epoch(run_model, criterion, loader, optimizer, dev, 0, lr_scheduler=lr_scheduler)
    gate.wait()  # the rest runs alone
    out = {'train img/s': loader.images_per_second(opts.steps), 'turns s': loader.turns,
           'loader share': loader.loader_share(), 'loader workers': train_loader.num_workers}
    out['GEMM peak share'] = flops * out['train img/s'] / gemm_peak(dev.device, dev.use_amp)
    out['precision'] = settings_label(dev) + (' compiled' if args.compile else '')

    eval_loader = runtime.make_loader(eval_set, args, dev.device, False)
    predict_probs(model, eval_loader, dev)  # warm-up
    start = time.perf_counter()
    probs, _ = predict_probs(model, eval_loader, dev)
    out['eval img/s'] = len(probs) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / 'model.pth'
        torch.save({'model': model.state_dict(), 'args': vars(args)}, ckpt)
        folder = Path(opts.data_path) / 'splits' / split_name(*args.test_val_ratio, runtime.split_seed(args))
        argv = ['--pred', 'True', '--resume', str(ckpt), '--eval_data_path', str(folder),
                '--pred_save_path', str(Path(tmp) / 'pred'), '--pred_save', 'True', '--num_workers',
                str(opts.num_workers), '--device', opts.device, '--use_amp', str(args.use_amp),
                '--channels_last', str(args.channels_last), '--depthwise_fp32', str(args.depthwise_fp32),
                '--cache', 'none']
        start = time.perf_counter()
        report = cli.main(argv)[0]
        out['predict img/s'] = len(report['table']) / (time.perf_counter() - start)
        if pipeline == 'tuned':
            out['onnx eval img/s'] = onnx_eval_speed(ckpt, Path(tmp) / 'model.onnx', eval_set, args)
    out['peak RSS MiB'] = peak_rss_mib()
    return out


def onnx_eval_speed(checkpoint, onnx_path, eval_set, args):
    """Evaluation images/s of the checkpoint exported by export.py and run by onnxruntime (CPU, fp32), over the same
    evaluation set and batch as PyTorch's ``eval img/s`` (one warm-up pass first)."""
    import export
    from engine import DeviceSettings
    from predict import OnnxClassifier
    export.export_onnx(checkpoint, onnx_path)
    model, dev = OnnxClassifier(onnx_path), DeviceSettings(torch.device('cpu'))
    loader = runtime.make_loader(eval_set, args, dev.device, False)
    predict_probs(model, loader, dev)  # warm-up
    start = time.perf_counter()
    probs, _ = predict_probs(model, loader, dev)
    return len(probs) / (time.perf_counter() - start)


def measure_timm(opts):
    """Training images/s of the timm peer (see the module docstring) in steady state, on the same images."""
    import timm
    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    args = pipeline_args(opts, 'timm')
    _, frame = training_images(opts, args)
    dev = runtime.device_settings(args)  # the same probe decides the peer's precision and memory format
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, label) in enumerate(zip(frame['path'], frame['label'])):  # an ImageFolder tree of links
            link = Path(tmp) / label / f'{i:06d}{Path(path).suffix}'
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(path)
        dataset = create_dataset('', root=tmp, split='train', is_training=True, class_map={k: i for i, k in
                                                                                          enumerate(LABELS)})
        loader = create_loader(dataset, input_size=(args.in_chans, args.input_size, args.input_size),
                               batch_size=args.batch_size, is_training=True, use_prefetcher=False,
                               scale=tuple(args.scale), hflip=args.hflip, vflip=args.vflip, interpolation='bicubic',
                               num_workers=args.num_workers if args.num_workers >= 0 else runtime.default_workers(),
                               pin_memory=dev.device.type == 'cuda', persistent_workers=False)
        model = timm.create_model(args.model, num_classes=len(LABELS), drop_path_rate=args.drop_path)
        flops = train_flops_per_image(model, args, torch.device('cpu'))
        model.to(dev.device, memory_format=dev.memory_format)
        optimizer = create_optimizer_v2(model, opt='adamw', lr=args.lr, weight_decay=args.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        gate = Gate(opts.report_fd)
        window = SteadyWindow(loader, opts.warmup, dev.device, opts.steps // opts.rounds, gate)
        model.train()
        for images, target in window:
            images = images.to(dev.device).contiguous(memory_format=dev.memory_format)
            with dev.autocast():
                loss = loss_fn(model(images), target.to(dev.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # timm's train.py reads the loss every step too
        gate.wait()  # the rest runs alone
    rate = window.images_per_second(opts.steps)
    return {'train img/s': rate, 'turns s': window.turns, 'precision': settings_label(dev),
            'loader share': window.loader_share(), 'loader workers': loader.num_workers,
            'GEMM peak share': flops * rate / gemm_peak(dev.device, dev.use_amp)}


def get_args_parser():
    """Command-line flags of benchmark.py."""
    p = argparse.ArgumentParser('Pipeline benchmark', allow_abbrev=False)
    p.add_argument('--data_path', default='data/elpv', help='prepared root (python preprocess_data.py --source elpv)')
    p.add_argument('--test_val_ratio', type=float, nargs=2, default=[0.25, 0.1])
    p.add_argument('--model', default='convnext_atto')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=20, help='timed training steps of each pipeline')
    p.add_argument('--rounds', type=int, default=4,
                   help='the timed steps run in this many turns, the pipelines taking turns on the machine')
    p.add_argument('--warmup', type=int, default=3, help='untimed training steps first (worker start-up included)')
    p.add_argument('--num_workers', type=int, default=-1)
    p.add_argument('--device', default='auto')
    p.add_argument('--compile', type=str2bool_or_auto, default='auto',
                   help='tuned pipeline: torch.compile (auto: as main.py decides it for a run of --epochs epochs)')
    p.add_argument('--epochs', type=int, default=40, help='the training run --compile auto decides for')
    p.add_argument('--opt_fused', type=str2bool, default=True, help="tuned pipeline: torch's fused AdamW step")
    p.add_argument('--reuse_freed_memory', type=str2bool, default=True,
                   help='tuned pipeline: glibc malloc keeps freed memory for reuse (runtime.reuse_freed_memory)')
    p.add_argument('--compare', type=str2bool, default=False, help='also run the plain pipeline')
    p.add_argument('--peer', default='none', choices=['none', 'timm'], help="also run timm's training loop")
    p.add_argument('--pipeline', default=None, choices=['tuned', 'plain', 'timm'], help=argparse.SUPPRESS)
    p.add_argument('--report_fd', type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    """Run the benchmark and print one table; returns {pipeline: figures}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = get_args_parser().parse_args(argv)
    if opts.pipeline:  # child process: one pipeline, figures as JSON on the last line
        print(json.dumps(measure_timm(opts) if opts.pipeline == 'timm' else measure(opts, opts.pipeline)))
        return None
    if not Path(opts.data_path).is_dir():
        raise DataError(f'{opts.data_path}: data path does not exist (python preprocess_data.py --source elpv '
                        f'--output {opts.data_path})')
    if opts.rounds < 1 or opts.steps < opts.rounds or opts.steps % opts.rounds:
        raise DataError(f'--steps {opts.steps} must be a multiple of --rounds {opts.rounds} (both at least 1)')
    pipelines = ['tuned'] + ['plain'] * opts.compare + ['timm'] * (opts.peer == 'timm')
    results = interleave({p: [sys.executable, __file__, *argv, '--pipeline', p] for p in pipelines}, opts.rounds)
    keys = ['train img/s', 'loader share', 'loader workers', 'GEMM peak share', 'eval img/s', 'onnx eval img/s',
            'predict img/s', 'peak RSS MiB']
    device = runtime.resolve_device(opts.device)
    print(f'\n{opts.model} {opts.input_size} px, batch {opts.batch_size}, {opts.steps} timed steps after '
          f'{opts.warmup} in {opts.rounds} interleaved turns, {device}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}')
    print(f'{"":16s}' + ''.join(f'{k:>20s}' for k in results))
    print(f'{"precision":16s}' + ''.join(f'{r["precision"]:>20s}' for r in results.values()))
    for k in keys:
        print(f'{k:16s}' + ''.join(f'{"-":>20s}' if k not in r else f'{r[k]:20d}' if isinstance(r[k], int)
                                   else f'{r[k]:20.2f}' for r in results.values()))
    ratios = {other: round_ratios(results['tuned']['turns s'], results[other]['turns s'])
              for other in ('plain', 'timm') if other in results}
    for other, rounds in ratios.items():
        print(f'training speed vs {other} in each round: ' + ' '.join(f'{r:.2f}x' for r in rounds))
    for other, rounds in ratios.items():  # the median over the rounds: one disturbed turn does not move it
        print(f'training speed vs {other}: {statistics.median(rounds):.2f}x')
    return results


if __name__ == '__main__':
    run_cli(main)
