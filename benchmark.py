"""Speed and memory benchmark of the training, evaluation and prediction pipelines (prints figures; not a test).

    python benchmark.py --data_path data/elpv --model convnext_atto --input_size 224 --batch_size 32 --compare True

For one model, input size and batch size it prints: training images/s (with the data loader's share of the step
time), evaluation images/s, prediction-mode images/s end to end (files in, predictions.csv and sorted image copies
out), and peak resident memory. The tuned pipeline decodes images once (``--cache memory``), runs bf16 autocast
(CPU) or fp16 (CUDA) and channels_last; ``--compare True`` runs the plain pipeline too (no cache, fp32, contiguous
memory) in the same process, and prints each figure's ratio.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

import main as cli
import runtime
from datasets import load_splits
from engine import predict_probs, train_one_epoch
from models import build_model
from preprocess_data import split_name
from softLabelLoss import SoftLabelLoss
from utils import run_cli, str2bool


def peak_rss_mib():
    """Peak resident memory of this process plus the largest of its finished children (DataLoader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def pipeline_args(opts, tuned):
    """main.py flags of the tuned or the plain pipeline."""
    flags = ['--model', opts.model, '--input_size', str(opts.input_size), '--batch_size', str(opts.batch_size),
             '--num_workers', str(opts.num_workers), '--device', opts.device, '--data_path', opts.data_path,
             '--test_val_ratio', *map(str, opts.test_val_ratio)]
    if tuned:
        flags += ['--cache', 'memory', '--use_amp', 'auto', '--channels_last', 'auto', '--compile', str(opts.compile)]
    else:
        flags += ['--cache', 'none', '--use_amp', 'False', '--channels_last', 'False']
    return cli.get_args_parser().parse_args(flags)


def measure(opts, tuned):
    """Figures of one pipeline: dict of images/s, loader share, cache build seconds."""
    args = pipeline_args(opts, tuned)
    dev = runtime.device_settings(args)
    splits = load_splits([opts.data_path], args.test_val_ratio, runtime.split_seed(args))
    n_train = (opts.warmup + opts.steps) * args.batch_size
    frame = splits['train'].iloc[:n_train]
    t0 = time.perf_counter()
    cache = runtime.make_cache(args, len(frame) + len(splits['test'])) if tuned else None
    train_set = runtime.make_dataset(frame, args, True, cache)
    eval_set = runtime.make_dataset(splits['test'], args, False, cache)
    cache_s = time.perf_counter() - t0
    model = build_model(args)
    run_model = runtime.prepare_model(model, args, dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = SoftLabelLoss(args.nb_classes).to(dev.device)

    def epoch(dataset):
        loader = runtime.make_loader(dataset, args, dev.device, True)
        start = time.perf_counter()
        stats = train_one_epoch(run_model, criterion, loader, optimizer, dev, 0)
        if dev.device.type == 'cuda':
            torch.cuda.synchronize()
        return stats, time.perf_counter() - start

    epoch(Subset(train_set, range(opts.warmup * args.batch_size)))  # warm-up: workers, allocator, compile
    stats, seconds = epoch(Subset(train_set, range(opts.warmup * args.batch_size, n_train)))
    out = {'train img/s': stats['images'] / seconds, 'loader share': stats['data_time'] / seconds,
           'cache build s': cache_s}

    loader = runtime.make_loader(eval_set, args, dev.device, False)
    predict_probs(model, loader, dev)  # warm-up
    start = time.perf_counter()
    probs, _ = predict_probs(model, loader, dev)
    out['eval img/s'] = len(probs) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / 'model.pth'
        torch.save({'model': model.state_dict(), 'args': vars(args)}, ckpt)
        folder = Path(opts.data_path) / 'splits' / split_name(*args.test_val_ratio, runtime.split_seed(args))
        argv = ['--pred', 'True', '--resume', str(ckpt), '--eval_data_path', str(folder),
                '--pred_save_path', str(Path(tmp) / 'pred'), '--pred_save', 'True', '--num_workers',
                str(opts.num_workers), '--device', opts.device, '--use_amp', str(args.use_amp),
                '--channels_last', str(args.channels_last), '--cache', 'none']
        start = time.perf_counter()
        report = cli.main(argv)[0]
        out['predict img/s'] = len(report['table']) / (time.perf_counter() - start)
    out['peak RSS MiB'] = peak_rss_mib()
    return out


def get_args_parser():
    """Command-line flags of benchmark.py."""
    p = argparse.ArgumentParser('Pipeline benchmark', allow_abbrev=False)
    p.add_argument('--data_path', default='data/elpv', help='prepared root (python preprocess_data.py --source elpv)')
    p.add_argument('--test_val_ratio', type=float, nargs=2, default=[0.25, 0.1])
    p.add_argument('--model', default='convnext_atto')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10, help='timed training steps')
    p.add_argument('--warmup', type=int, default=2, help='untimed training steps first')
    p.add_argument('--num_workers', type=int, default=-1)
    p.add_argument('--device', default='auto')
    p.add_argument('--compile', type=str2bool, default=False)
    p.add_argument('--compare', type=str2bool, default=False, help='also run the plain pipeline')
    p.add_argument('--pipeline', default=None, choices=['tuned', 'plain'], help=argparse.SUPPRESS)
    return p


def measure_in_child(argv, pipeline):
    """Run one pipeline in a fresh Python process (so that its peak memory is its own); returns its figures."""
    proc = subprocess.run([sys.executable, __file__, *argv, '--pipeline', pipeline], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'{pipeline} pipeline failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Run the benchmark and print one table; returns {pipeline: figures}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = get_args_parser().parse_args(argv)
    if opts.pipeline:  # child process: one pipeline, figures as JSON on the last line
        print(json.dumps(measure(opts, opts.pipeline == 'tuned')))
        return None
    results = {'tuned': measure_in_child(argv, 'tuned')}
    if opts.compare:
        results['plain'] = measure_in_child(argv, 'plain')
    keys = ['train img/s', 'loader share', 'eval img/s', 'predict img/s', 'cache build s', 'peak RSS MiB']
    device = runtime.resolve_device(opts.device)
    print(f'\n{opts.model} {opts.input_size} px, batch {opts.batch_size}, {opts.steps} steps, {device}, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}')
    print(f'{"":16s}' + ''.join(f'{k:>14s}' for k in results) + ('      ratio' if opts.compare else ''))
    for k in keys:
        row = f'{k:16s}' + ''.join(f'{r[k]:14.2f}' for r in results.values())
        if opts.compare and 'img/s' in k:
            row += f'{results["tuned"][k] / results["plain"][k]:10.2f}x'
        print(row)
    return results


if __name__ == '__main__':
    run_cli(main)
