"""Run plumbing shared by training, FCMAE pretraining, evaluation, prediction and the benchmark: the device and its
precision, data loaders, the decode-once image cache, Datasets from flags, and model placement.

Every function takes main.py's flags (an ``argparse.Namespace``) and turns them into objects; the rules of what the
objects do live in the modules they come from (datasets, engine, models, distributed).
"""
import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from datasets import (DefectDataset, ImageCache, build_transform, cache_fits, cache_side, collate_skip,
                      is_split_folder, label_counts, load_splits, upsample)
from distributed import ShardSampler, init_distributed, is_distributed, main_first, world_size
from engine import EVAL_BATCH_FACTOR, DeviceSettings
from labels import LABELS
from models import build_model
from precision import choose as choose_precision, choose_run, compile_error, depthwise_wgrad
from preprocess_data import drop_boxes, split_name
from utils import DataError
from workers import choose_workers

log = logging.getLogger('runtime')


def split_seed(args):
    """Seed of the data split: --split_seed, or --seed when it is not given (argparse.Namespace -> int)."""
    return args.split_seed if getattr(args, 'split_seed', None) is not None else args.seed


def resolve_device(name):
    """torch.device for --device (auto: CUDA when available, else CPU); under torchrun, this process's GPU.

    Raises:
        DataError: CUDA asked for but not available.
    """
    if name != 'auto' and name.startswith('cuda') and not torch.cuda.is_available():
        raise DataError(f'--device {name}: CUDA is not available on this machine')
    if name not in ('auto', 'cpu', 'cuda') and not is_distributed():
        return torch.device(name)
    return init_distributed(name)[0]


# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit systems
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20


def reuse_freed_memory():
    """Make glibc malloc keep freed memory for reuse: blocks up to 32 MiB come from the heap instead of their own
    mmap, and freed heap memory is not handed back to the system (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD,
    M_TOP_PAD; see mallopt(3)).

    By default glibc maps every block above its (adaptive) threshold afresh and unmaps it when freed, so each
    training step touches its activation tensors (tens of MiB at batch 32) as new pages: tens of thousands of page
    faults per step, each a zeroed page from the kernel. PyTorch's CPU tensors use malloc, so with this call the
    second and later steps reuse the pages of the first. The process keeps its peak heap size (as PyTorch's CUDA
    caching allocator keeps GPU memory). Process-wide; call once before training.

    Returns:
        bool: True when all three parameters were set; False where the C library is not glibc (no mallopt, or it
        refused a value), which changes nothing.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_TOP_PAD, 64 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])


def device_settings(args, device=None, build=None, inference=False, steps=None):
    """``engine.DeviceSettings`` from the flags --device, --use_amp, --amp_dtype, --channels_last, --depthwise_fp32
    and --depthwise_wgrad; for a training run of ``steps`` steps also --compile.

    ``auto`` values are decided for this machine (``precision.choose``: a timed probe of the model, remembered per
    machine; with ``steps``, ``precision.choose_run``: precision and compiling together) and written back into
    ``args``, so that args.json and checkpoints record what the run used. With --reuse_freed_memory (the default) it
    first calls ``reuse_freed_memory``, so the probe times what the run gets.

    Args:
        args: argparse.Namespace. device: torch.device already resolved (default: ``resolve_device(args.device)``).
        build: callable returning a fresh model to probe (default: the classifier of ``args``).
        inference: decide for evaluation and prediction (the probe times forward passes; ``precision.choose``).
        steps: int, forward+backward steps of the training run (epochs x steps per epoch; fewer where
            --time_budget minutes hold fewer, see ``precision.choose_run``), or None: --compile is left as it is.
    """
    device = device if device is not None else resolve_device(args.device)
    if getattr(args, 'reuse_freed_memory', False) and not reuse_freed_memory():
        log.info('--reuse_freed_memory: no glibc mallopt here, or it refused a value; malloc left as it is')
    build = build or (lambda: build_model(args))
    if steps is None:
        args.use_amp, args.channels_last, args.depthwise_fp32, args.amp_dtype = choose_precision(
            args, device, build, inference)
    else:
        max_seconds = 60 * args.time_budget if getattr(args, 'time_budget', None) else None
        args.use_amp, args.channels_last, args.depthwise_fp32, args.amp_dtype, args.compile = choose_run(
            args, device, build, steps, max_seconds)
    return DeviceSettings(device, args.use_amp, args.amp_dtype, args.channels_last, args.depthwise_fp32,
                          depthwise_wgrad(args))


def default_workers(world_size=1):
    """DataLoader workers per process: the CPU cores this process may use, shared among the processes, minus one
    for the training loop itself; at least 0 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, world_size) - 1))


def settle_workers(args, dev, dataset, build, epochs):
    """Resolve ``--num_workers -1`` of a training or pretraining run on ``dataset`` (its training Dataset) with
    ``workers.choose_workers`` (measured on a CPU) and set ``args.num_workers`` to the count, which the loaders
    ``make_loader`` builds after take (and args.json records). ``dev``: the run's ``DeviceSettings``; ``build``:
    callable returning a fresh model; ``epochs``: int. Returns the count."""
    def loader(n):
        return make_loader(dataset, args, dev.device, True, workers=n)

    args.num_workers = choose_workers(args, dev, build, loader, len(loader(0)), epochs, default_workers(world_size()))
    return args.num_workers


def make_loader(dataset, args, device, train, workers=None):
    """DataLoader over a DefectDataset (skipped images dropped by ``collate_skip``); a batch twice as large to
    evaluate. Under torchrun, training uses ``DistributedSampler`` and evaluation ``ShardSampler``.

    Args:
        dataset: torch Dataset. args: flags (batch_size, num_workers, pin_mem, seed). device: torch.device.
        workers: worker count in place of ``args.num_workers``; -1 in either: ``default_workers``.
        train: shuffle with a seeded generator (``loader.generator``) and drop the last partial batch. Training
            workers start afresh each epoch (not persistent): a worker seeds the RNGs augmentation draws from
            (torch, random, numpy) only when it starts, from the loader's generator, which ``seed_loader`` reseeds
            each epoch (under torchrun, from the process's RNG, which a checkpoint restores). So a resumed run's
            augmentation repeats the uninterrupted run's. Evaluation workers draw nothing at random and persist.
    """
    workers = args.num_workers if workers is None else workers
    workers = workers if workers >= 0 else default_workers(world_size())
    sampler, generator = None, None
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True) if train \
            else ShardSampler(dataset)
    elif train:
        generator = torch.Generator()
        generator.manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size if train else args.batch_size * EVAL_BATCH_FACTOR,
                      shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(dataset) > args.batch_size, num_workers=workers,
                      pin_memory=args.pin_mem and device.type == 'cuda', collate_fn=collate_skip,
                      persistent_workers=workers > 0 and not train, generator=generator)


def seed_loader(loader, seed, epoch):
    """Make an epoch's sample order a function of (seed, epoch), resumed or not: ``DistributedSampler.set_epoch``
    under torchrun, else the training loader's generator reseeded with seed + epoch."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(seed + epoch)


def make_cache(args, n_images, folder=None):
    """ImageCache for --cache (None for none); its file goes into ``folder`` (a split folder's cache/) if given.
    The cached side covers evaluation (``--crop_pct``) and the smallest training crop (``--scale``)."""
    side = cache_side(args.input_size, args.crop_pct, min(max(getattr(args, 'scale', (1.0,))[0], 1e-3), 1.0))
    mode = args.cache
    if mode == 'auto':
        mode = 'file' if cache_fits(n_images, side) else 'none'
        if mode == 'none':
            log.info(f'{n_images} images at {side} px do not fit in memory: decoding them each epoch')
    if mode == 'none':
        return None
    return ImageCache(side, Path(folder) / f'images_{side}px.safetensors' if mode == 'file' and folder else None)


def cache_folder(data_path, args):
    """Folder for the image cache file of a data path: ``<split folder>/cache`` (None for a plain folder)."""
    path = Path(data_path)
    if is_split_folder(path):
        return path / 'cache'
    if (path / 'list.csv').is_file() or (path / 'splits').is_dir():
        return path / 'splits' / split_name(*args.test_val_ratio, split_seed(args)) / 'cache'
    return None


def eval_cache(data, args, n_images):
    """Image cache for evaluation/prediction: the split's cache file when the data is a prepared root, else none
    (one pass over a plain folder gains nothing from a cache)."""
    folder = cache_folder(data, args)
    return make_cache(args, n_images, folder) if folder is not None else None


def make_dataset(frame, args, train, cache=None):
    """DefectDataset with the transforms of ``args`` (one sample per image unless --use_bbox True)."""
    return DefectDataset(frame if args.use_bbox else drop_boxes(frame), build_transform(train, args),
                         in_chans=args.in_chans, padding=args.padding, padding_size=args.padding_size,
                         use_shift=train and args.use_shift, strict=args.strict_images, cache=cache)


@dataclass
class TrainingData:
    """The data of a training run: split lists (DataFrames), Datasets, loaders (val_loader None without a validation
    split) and the image cache (None without one)."""
    splits: dict
    train_set: DefectDataset
    val_set: DefectDataset
    train_loader: DataLoader
    val_loader: DataLoader
    cache: ImageCache


def check_training_list(frame, data_path):
    """``frame`` (a training split's sample list) when it can be trained on.

    Raises:
        DataError: the list is empty or holds samples without one of the four labels (one line naming ``data_path``).
    """
    if not len(frame) or not frame['label'].isin(LABELS).all():
        raise DataError(f'{data_path}: the training split is empty or has unlabelled samples')
    return frame


def load_training_data(args, device):
    """Split lists, the upsampled training list, the image cache, Datasets and loaders of a training run.

    Rank 0 makes the split and the image cache file first; under torchrun the other processes then reuse them.

    Raises:
        DataError: see ``datasets.load_splits``; an empty training split or one with unlabelled samples.
    """
    splits = main_first(lambda: load_splits(args.data_path, args.test_val_ratio, split_seed(args), args.label_list))
    train_frame = check_training_list(splits['train'], args.data_path[0])
    log.info(f'train {label_counts(train_frame)}, val {label_counts(splits["val"]) if len(splits["val"]) else {}}, '
             f'test {label_counts(splits["test"]) if len(splits["test"]) else {}}')
    train_frame = upsample(train_frame, args.upsample, args.seed)
    cache = make_cache(args, sum(len(f) for f in splits.values()), cache_folder(args.data_path[0], args))
    train_set, val_set = main_first(lambda: (make_dataset(train_frame, args, True, cache),
                                             make_dataset(splits['val'], args, False, cache)))
    return TrainingData(splits, train_set, val_set, *training_loaders(train_set, val_set, args, device), cache)


def training_loaders(train_set, val_set, args, device):
    """(training DataLoader, validation DataLoader or None for an empty ``val_set``) of a training run."""
    val_loader = make_loader(val_set, args, device, False) if len(val_set) else None
    return make_loader(train_set, args, device, True), val_loader


def warn_eager(error):
    """Log the one warning of a run that falls back from torch.compile to eager mode (``error``: the exception)."""
    log.warning(f'--compile True: torch.compile failed ({compile_error(error)}); running eagerly')


class CompiledModule(torch.nn.Module):
    """A module run through ``torch.compile`` (static shapes: one graph per batch shape), falling back to eager mode
    for the rest of the run, with one warning, when compiling fails at any call (a new batch shape included) or,
    through ``fall_back``, in the backward graph (``engine.train_one_epoch``).

    Only compiler errors (``torch._dynamo.exc.TorchDynamoException``, which wraps back-end failures) fall back;
    errors of the model itself propagate. ``module`` is its only registered child: ``parameters()``,
    ``state_dict()``, ``train()`` and ``eval()`` are the wrapped module's.

    Args:
        module: nn.Module to call (the model, or its DistributedDataParallel wrapper).

    Raises:
        Exception: whatever ``torch.compile`` itself raises (prepare_model catches it and stays eager).
    """

    def __init__(self, module):
        super().__init__()
        self.module = module
        object.__setattr__(self, 'compiled', torch.compile(module, dynamic=False))  # not a second child
        self.failed = False

    def fall_back(self, error):
        """Run eagerly from now on, with the one warning naming ``error`` (the compiler's exception); training calls
        it when the backward graph, which torch compiles at the first backward, fails."""
        self.failed = True
        warn_eager(error)

    def forward(self, *args, **kwargs):
        """The compiled module's output, or the eager module's once compiling has failed (one warning)."""
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                self.fall_back(e)
        return self.module(*args, **kwargs)


def prepare_model(model, args, dev):
    """Move a model to the device as ``dev`` says (``DeviceSettings.prepare``) and wrap it for training/inference.

    Args:
        model: nn.Module. args: flags (compile). dev: ``engine.DeviceSettings``.

    Returns:
        the module to call: ``model`` itself, DDP under torchrun (trainable models in training mode; on CUDA its
        BatchNorm layers become SyncBatchNorm), and/or a ``CompiledModule`` (``--compile True``: compiled at the
        first call, eager with a warning when compiling fails).
    """
    dev.prepare(model)
    run_model = model
    if is_distributed() and any(p.requires_grad for p in model.parameters()) and model.training:
        device_ids = [dev.device.index] if dev.device.type == 'cuda' else None
        if dev.device.type == 'cuda':  # --norm_layer batchnorm: statistics over all GPUs' batches (CUDA only)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module
        run_model = DistributedDataParallel(model, device_ids=device_ids)
    if args.compile is True:  # 'auto' is resolved before (precision.choose_compile)
        try:
            run_model = CompiledModule(run_model)
        except Exception as e:  # compiler back ends raise many kinds of errors
            warn_eager(e)
    return run_model
