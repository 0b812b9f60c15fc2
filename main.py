"""Train, evaluate and predict with ConvNeXt on defect images with soft labels.

    python main.py --data_path data/elpv --model convnext_atto --nb_classes 2 --use_softlabel True \
        --output_dir output/elpv
    python main.py --eval True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv
    python main.py --pred True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv \
        --pred_save_path output/elpv/pred --pred_save True --pred_eval True
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from datasets import (DefectDataset, ImageCache, balanced_label_weights, build_transform, cache_fits, cache_side,
                      collate_skip, is_split_folder, label_counts,
                      load_eval_frame, load_splits, upsample)
from distributed import (ShardSampler, barrier, cleanup, init_distributed, is_distributed, is_main_process,
                         main_first, world_size)
from distributed import rank as get_rank
from engine import evaluate, format_metrics, predict_probs, train_one_epoch, write_prediction_report
from metrics import is_better
from models import build_model, load_pretrained, read_checkpoint
from preprocess_data import PADDING_MODES, drop_boxes, split_name
from softLabelLoss import LABELS, LOSS_FUNCTIONS, SoftLabelLoss, check_ratio, head_classes
from utils import (DataError, atomic_torch_save, atomic_write_json, atomic_write_text, rng_state, seed_everything,
                   run_cli, set_rng_state, str2bool)

log = logging.getLogger('main')
# flags that describe the model and its input: for --eval/--pred they come from the checkpoint unless given
CHECKPOINT_FLAGS = ('model', 'nb_classes', 'in_chans', 'input_size', 'normalize', 'crop_pct', 'use_bbox', 'padding',
                    'padding_size', 'soft_label_ratio', 'test_val_ratio', 'seed', 'split_seed', 'label_list',
                    'use_softlabel')


def get_args_parser():
    """All command-line flags of main.py (boolean flags take True/False)."""
    p = argparse.ArgumentParser('ConvNeXt soft-label defect classifier', allow_abbrev=False)
    g = p.add_argument_group('model')
    g.add_argument('--model', default='convnext_atto', help='any timm ConvNeXt V1/V2 name, or convnext_isotropic_*')
    g.add_argument('--nb_classes', type=int, default=2, choices=[2, 4], help='head: 2 (neg, pos) or 4 classes')
    g.add_argument('--in_chans', type=int, default=3, choices=[1, 3])
    g.add_argument('--input_size', type=int, default=224, help='pixels (square)')
    g.add_argument('--drop_path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--layer_scale_init_value', type=float, default=None, help='layer scale init (V1; timm default)')
    g.add_argument('--head_init_scale', type=float, default=1.0)
    g.add_argument('--finetune', default='', help='local checkpoint (or URL) to start from')
    g.add_argument('--model_key', default='model|model_ema|module|state_dict')
    g.add_argument('--model_ema', type=str2bool, default=False)
    g.add_argument('--model_ema_decay', type=float, default=0.9999)
    g.add_argument('--model_ema_eval', type=str2bool, default=False, help='also evaluate the EMA model each epoch')

    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=32, help='per process')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('--update_freq', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--opt', default='adamw', help='timm optimizer name')
    g.add_argument('--opt_eps', type=float, default=1e-8)
    g.add_argument('--opt_betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight_decay', type=float, default=0.05)
    g.add_argument('--clip_grad', type=float, default=None, help='max gradient norm')
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--layer_decay', type=float, default=None, help='layer-wise LR decay, e.g. 0.8')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--warmup_epochs', type=int, default=1)
    g.add_argument('--warmup_lr', type=float, default=1e-6)
    g.add_argument('--min_lr', type=float, default=1e-6)

    g = p.add_argument_group('augmentation')
    g.add_argument('--normalize', default='per_image', choices=['per_image', 'imagenet'],
                   help='per_image: zero mean, unit variance per image; imagenet: ImageNet mean/std')
    g.add_argument('--scale', type=float, nargs=2, default=[0.8, 1.0],
                   help="RandomResizedCrop area range (timm's ImageNet 0.08 1 shrinks thin defects out of sight)")
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.5, help='defect images have no up or down')
    g.add_argument('--color_jitter', type=float, default=0.0)
    g.add_argument('--aa', default='none', help='RandAugment policy, e.g. rand-m9-mstd0.5-inc1; none to disable')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--crop_pct', type=float, default=1.0, help='evaluation centre-crop fraction')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha')
    g.add_argument('--cutmix_minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup_prob', type=float, default=1.0)
    g.add_argument('--mixup_switch_prob', type=float, default=0.5)
    g.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing on top of the soft targets')

    g = p.add_argument_group('soft labels')
    g.add_argument('--use_softlabel', type=str2bool, default=False)
    g.add_argument('--soft_label_ratio', type=float, default=0.7, help='r: weight an ambiguous label keeps')
    g.add_argument('--label_ratio', type=float, default=1.0, help='q: weight a certain label keeps')
    g.add_argument('--soft_type', type=int, default=1, choices=[1, 2])
    g.add_argument('--lossfn', default='CE', choices=LOSS_FUNCTIONS)
    g.add_argument('--class_weight', default='none', choices=['none', 'balanced'],
                   help='balanced: per-label loss weights n / (4 n_label) from the training counts (shifts P(defect) '
                        'away from the data\'s prior, so it costs calibration)')

    g = p.add_argument_group('data')
    g.add_argument('--data_path', nargs='+', default=None, help='prepared roots or split folders (union)')
    g.add_argument('--eval_data_path', default=None, help='data for --eval/--pred (default: first --data_path)')
    g.add_argument('--eval_split', default='test', choices=['train', 'val', 'test', 'all'])
    g.add_argument('--test_val_ratio', type=float, nargs=2, default=[0.2, 0.1], metavar=('TEST', 'VAL'))
    g.add_argument('--label_list', nargs='*', default=None, help='map folder names to labels: crack=pos ok=neg')
    g.add_argument('--upsample', type=float, nargs=4, default=None, metavar=('AMB_NEG', 'AMB_POS', 'NEG', 'POS'))
    g.add_argument('--use_bbox', type=str2bool, default=False)
    g.add_argument('--padding', default='PIXEL', choices=PADDING_MODES)
    g.add_argument('--padding_size', type=int, default=0)
    g.add_argument('--use_shift', type=str2bool, default=False, help='random crop shift at train time')
    g.add_argument('--strict_images', type=str2bool, default=False, help='stop on a corrupt image')
    g.add_argument('--num_workers', type=int, default=-1,
                   help='DataLoader workers per process; -1: CPU cores per process minus one, at most 8')
    g.add_argument('--pin_mem', type=str2bool, default=True, help='pinned memory (CUDA only)')
    g.add_argument('--cache', default='auto', choices=['auto', 'memory', 'file', 'none'],
                   help='decode and resize images once: memory, file (memory plus a file beside the split), '
                        'none; auto = file when the images fit in a quarter of the free memory')

    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='output')
    g.add_argument('--log_dir', default=None, help='TensorBoard root (default: --output_dir)')
    g.add_argument('--log_name', default='tensorboard')
    g.add_argument('--best_metric', default='auroc', help='validation metric choosing checkpoint-best.pth')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--seed', type=int, default=0, help='training seed (and split seed unless --split_seed)')
    g.add_argument('--split_seed', type=int, default=None, help='seed of the train/val/test split (default --seed)')
    g.add_argument('--resume', nargs='+', default=None, help='checkpoint(s): continue training, or --eval/--pred')
    g.add_argument('--auto_resume', type=str2bool, default=False, help='continue from OUTPUT/checkpoint-last.pth')
    g.add_argument('--use_amp', type=str2bool, default=False, help='bf16 autocast on CPU, fp16/bf16 on CUDA')
    g.add_argument('--amp_dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    g.add_argument('--channels_last', type=str2bool, default=True, help='NHWC memory format (faster convolutions)')
    g.add_argument('--compile', type=str2bool, default=False, help='torch.compile the model (eager on failure)')
    g.add_argument('--early_stop', type=str2bool, default=False)
    g.add_argument('--early_stop_epoch', type=int, default=10, help='epochs without improvement before stopping')
    g.add_argument('--eval', type=str2bool, default=False, help='evaluate --resume on --eval_data_path')
    g.add_argument('--test', type=str2bool, default=True, help='evaluate the best checkpoint on test after training')

    g = p.add_argument_group('FCMAE pretraining (ConvNeXt V2, Woo et al. 2023)')
    g.add_argument('--pretrain', type=str2bool, default=False,
                   help='self-supervised FCMAE pretraining of --model (a convnextv2_* name) on the images')
    g.add_argument('--mask_ratio', type=float, default=0.6, help='fraction of 32x32 patches masked')
    g.add_argument('--decoder_depth', type=int, default=1)
    g.add_argument('--decoder_embed_dim', type=int, default=512)
    g.add_argument('--norm_pix_loss', type=str2bool, default=True, help='normalise each target patch')

    g = p.add_argument_group('prediction')
    g.add_argument('--pred', type=str2bool, default=False, help='prediction mode')
    g.add_argument('--pred_save_path', default=None, help='prediction output folder')
    g.add_argument('--pred_save', type=str2bool, default=False, help='copy images sorted by true/predicted label')
    g.add_argument('--pred_save_with_conf', type=str2bool, default=False, help='prefix copies with P(defect)')
    g.add_argument('--pred_eval', type=str2bool, default=False, help='draw evaluation graphs')
    g.add_argument('--pred_eval_name', default='', help='prefix of the graph file names')
    g.add_argument('--conf', type=float, default=0.5, help='decision threshold on P(defect)')
    g.add_argument('--several_models', type=str2bool, default=False, help='average the --resume checkpoints')
    return p


def explicit_flags(argv):
    """Names of the flags given on the command line (``--name`` or ``--name=value``)."""
    return {a[2:].split('=', 1)[0] for a in argv if a.startswith('--')}


def check_args(args):
    """Validate flag values; raises DataError with a one-line message naming the flag."""
    try:
        check_ratio('soft_label_ratio', args.soft_label_ratio)
        check_ratio('label_ratio', args.label_ratio)
        check_ratio('conf', args.conf)
        head_classes(args.nb_classes)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not 0 <= args.smoothing < 1:
        raise DataError(f'--smoothing must lie in [0, 1), got {args.smoothing}')
    if args.batch_size < 1 or args.epochs < 0 or args.update_freq < 1:
        raise DataError('--batch_size and --update_freq must be >= 1 and --epochs >= 0')
    if args.input_size % 32:
        raise DataError(f'--input_size must be a multiple of 32, got {args.input_size}')
    if not 0 <= args.mask_ratio < 1:
        raise DataError(f'--mask_ratio must lie in [0, 1), got {args.mask_ratio}')


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


def default_workers(world_size=1):
    """DataLoader workers per process: the CPU cores this process may use, shared among the processes, minus one
    for the training loop itself; at least 0 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, world_size) - 1))


def make_loader(dataset, args, device, train):
    """DataLoader over a DefectDataset (skipped images dropped by ``collate_skip``); a batch twice as large to
    evaluate. Under torchrun, training uses ``DistributedSampler`` and evaluation ``ShardSampler``."""
    workers = args.num_workers if args.num_workers >= 0 else default_workers(world_size())
    sampler, generator = None, None
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True) if train \
            else ShardSampler(dataset)
    elif train:
        generator = torch.Generator()
        generator.manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size if train else args.batch_size * 2,
                      shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(dataset) > args.batch_size, num_workers=workers,
                      pin_memory=args.pin_mem and device.type == 'cuda', collate_fn=collate_skip,
                      persistent_workers=workers > 0, generator=generator)


def make_cache(args, n_images, folder=None):
    """ImageCache for --cache (None for none); its file goes into ``folder`` (a split folder's cache/) if given."""
    side = cache_side(args.input_size, args.crop_pct)
    mode = args.cache
    if mode == 'auto':
        mode = 'file' if cache_fits(n_images, side) else 'none'
        if mode == 'none':
            log.info(f'{n_images} images at {side} px do not fit in memory: decoding them each epoch')
    if mode == 'none':
        return None
    return ImageCache(side, Path(folder) / f'images_{side}px.pkl' if mode == 'file' and folder else None)


def cache_folder(data_path, args):
    """Folder for the image cache file of a data path: ``<split folder>/cache`` (None for a plain folder)."""
    path = Path(data_path)
    if is_split_folder(path):
        return path / 'cache'
    if (path / 'list.csv').is_file() or (path / 'splits').is_dir():
        return path / 'splits' / split_name(*args.test_val_ratio, split_seed(args)) / 'cache'
    return None


def make_dataset(frame, args, train, cache=None):
    """DefectDataset with the transforms of ``args`` (one sample per image unless --use_bbox True)."""
    return DefectDataset(frame if args.use_bbox else drop_boxes(frame), build_transform(train, args),
                         in_chans=args.in_chans, padding=args.padding, padding_size=args.padding_size,
                         use_shift=train and args.use_shift, strict=args.strict_images, cache=cache)


def prepare_model(model, args, device):
    """Move a model to ``device`` (channels_last when asked) and wrap it for training/inference.

    Returns:
        (module to call: DDP under torchrun and/or torch.compile'd, memory format of the inputs).
    """
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    run_model = model
    if is_distributed() and any(p.requires_grad for p in model.parameters()) and model.training:
        run_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        try:
            compiled = torch.compile(run_model)
            with torch.no_grad():  # compile now, so that a failure falls back here and not mid-epoch
                compiled(torch.zeros(2, args.in_chans, args.input_size, args.input_size, device=device)
                         .to(memory_format=memory_format))
            run_model = compiled
        except Exception as e:  # compiler back ends raise many kinds of errors
            log.warning(f'--compile True: torch.compile failed ({e.__class__.__name__}: '
                        f'{str(e).splitlines()[0][:160] if str(e) else ""}); running eagerly')
    return run_model, memory_format


def check_output_dir(args):
    """Refuse an output folder that already holds a run unless resuming (nothing is ever overwritten silently)."""
    out = Path(args.output_dir)
    held = [n for n in ('checkpoint-last.pth', 'finished.json', 'log.txt') if (out / n).exists()]
    if held and not (args.resume or args.auto_resume):
        raise DataError(f'{out}: already holds a run ({", ".join(held)}); pass --auto_resume True to continue it, '
                        f'or choose another --output_dir')


def save_checkpoint(path, model, optimizer, lr_scheduler, scaler, model_ema, epoch, state, args):
    """Write a full training checkpoint atomically."""
    atomic_torch_save({
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'epoch': epoch, 'args': {k: v for k, v in vars(args).items()}, 'rng': _rng_for_checkpoint(), **state,
    }, path)


def _rng_for_checkpoint():
    """RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    state = rng_state()
    name, keys, pos, has_gauss, cached = state['numpy']
    state['numpy'] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    return state


def _restore_rng(state):
    if 'numpy' in state:
        name, keys, pos, has_gauss, cached = state['numpy']
        state = {**state, 'numpy': (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}
    set_rng_state(state)


def load_model_state(model, state_dict, path):
    """Load a checkpoint's weights strictly; raises DataError naming the file if they belong to another model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise DataError(f'{path}: checkpoint does not fit --model {model.__class__.__name__} '
                        f'({first[0][:160] if first else "keys differ"})') from None


def resume_point(args):
    """Where a run in ``--output_dir`` starts: ``--resume``, else with ``--auto_resume`` its checkpoint-last.pth.

    Returns:
        (checkpoint path or None, the finished.json summary when ``--auto_resume`` finds the run finished, else None).
    """
    out = Path(args.output_dir)
    if args.auto_resume and (out / 'finished.json').is_file():
        print(f'{out}: run already finished; nothing to do')
        return None, json.loads((out / 'finished.json').read_text())
    if args.resume:
        return args.resume[0], None
    last = out / 'checkpoint-last.pth'
    return (str(last) if args.auto_resume and last.is_file() else None), None


def train(args):
    """Train with validation each epoch; write checkpoints, log.txt, TensorBoard events; test the best checkpoint.

    Under torchrun every process trains on its shard (DistributedDataParallel) and metrics are computed on the
    predictions gathered from all processes; only rank 0 writes files.

    Returns:
        dict: the summary written to finished.json.
    """
    from torch.utils.tensorboard import SummaryWriter
    check_output_dir(args)
    if not args.data_path:
        raise DataError('--data_path is required to train')
    out = Path(args.output_dir)
    device = resolve_device(args.device)
    main_proc = is_main_process()
    seed_everything(args.seed)
    resume, finished = resume_point(args)
    if finished is not None:
        return finished

    # rank 0 makes the split and the image cache file first; the others then reuse them
    splits = main_first(lambda: load_splits(args.data_path, args.test_val_ratio, split_seed(args), args.label_list))
    train_frame = splits['train']
    if not len(train_frame) or not train_frame['label'].isin(LABELS).all():
        raise DataError(f'{args.data_path[0]}: the training split is empty or has unlabelled samples')
    log.info(f'train {label_counts(train_frame)}, val {label_counts(splits["val"]) if len(splits["val"]) else {}}, '
             f'test {label_counts(splits["test"]) if len(splits["test"]) else {}}')
    train_frame = upsample(train_frame, args.upsample, args.seed)
    cache = make_cache(args, sum(len(f) for f in splits.values()), cache_folder(args.data_path[0], args))
    train_set, val_set = main_first(lambda: (make_dataset(train_frame, args, True, cache),
                                             make_dataset(splits['val'], args, False, cache)))
    train_loader = make_loader(train_set, args, device, True)
    val_loader = make_loader(val_set, args, device, False) if len(val_set) else None

    model = build_model(args)
    if args.finetune:
        load_pretrained(model, args.finetune, args.model_key)
    run_model, memory_format = prepare_model(model, args, device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    n_params = sum(p.numel() for p in model.parameters())
    updates_per_epoch = max(1, len(train_loader) // args.update_freq)
    log.info(f'model {args.model}: {n_params / 1e6:.2f}M parameters; {world_size()} process(es) on {device}, '
             f'effective batch {args.batch_size * args.update_freq * world_size()} '
             f'({args.batch_size} x {args.update_freq} accumulation x {world_size()} processes), lr {args.lr:g}, '
             f'{updates_per_epoch} updates per epoch, {train_loader.num_workers} loader worker(s)')
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay,
                                    **({'eps': args.opt_eps} if args.opt_eps is not None else {}),
                                    **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}))
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, step_on_epochs=False,
                                          updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler('cuda') if args.use_amp and device.type == 'cuda' and \
        args.amp_dtype == 'float16' else None
    label_weight = balanced_label_weights(train_frame) if args.class_weight == 'balanced' else None
    criterion = SoftLabelLoss(args.nb_classes, args.use_softlabel, args.soft_label_ratio, args.label_ratio,
                              args.soft_type, args.lossfn, args.smoothing, label_weight).to(device)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=0.0, num_classes=args.nb_classes, multi_label=True)

    state = {'best_metric': None, 'best_epoch': -1, 'stale_epochs': 0, 'skipped_images': 0}
    start_epoch = 0
    if resume:
        ckpt = read_checkpoint(resume)
        if not isinstance(ckpt, dict) or 'model' not in ckpt or 'optimizer' not in ckpt:
            raise DataError(f'{resume}: not a training checkpoint of main.py (use --finetune for plain weights)')
        load_model_state(model, ckpt['model'], resume)
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('lr_scheduler'):
            lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        if model_ema is not None and ckpt.get('model_ema'):
            model_ema.module.load_state_dict(ckpt['model_ema'])
        state.update({k: ckpt[k] for k in state if k in ckpt})
        start_epoch = ckpt['epoch'] + 1
        if ckpt.get('rng'):
            _restore_rng(ckpt['rng'])
        log.info(f'resumed from {resume} at epoch {start_epoch}')
        if main_proc and (out / 'log.txt').is_file():  # drop epochs after the checkpoint (killed before saving)
            kept = [line for line in (out / 'log.txt').read_text().splitlines()
                    if line.strip() and json.loads(line).get('epoch', -1) < start_epoch]
            atomic_write_text(''.join(f'{line}\n' for line in kept), out / 'log.txt')

    writer = None
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        tb_dir = Path(args.log_dir or args.output_dir) / args.log_name
        for folder in (out, tb_dir):  # the event folder describes its run too (load_board.py reads it)
            atomic_write_json(vars(args), folder / 'args.json')
        writer = SummaryWriter(log_dir=str(tb_dir),
                               purge_step=start_epoch * len(train_loader) if start_epoch else None)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        seed_everything(args.seed + epoch + 1000 * get_rank())  # same order and augmentation, resumed or not
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(args.seed + epoch)
        stats = train_one_epoch(run_model, criterion, train_loader, optimizer, device, epoch, lr_scheduler, scaler,
                                model_ema, mixup_fn, args.update_freq, args.clip_grad, args.use_amp, args.amp_dtype,
                                writer, memory_format=memory_format)
        lr_scheduler.step(epoch + 1)
        record = {'epoch': epoch, 'train_loss': stats['loss'], 'lr': stats['lr'], 'train_images': stats['images']}
        state['skipped_images'] = max(state['skipped_images'], stats['skipped'])
        metrics = {}
        if val_loader is not None:
            metrics, _, _ = evaluate(model, val_loader, device, val_set.frame, args.conf, args.soft_label_ratio,
                                     args.use_amp, args.amp_dtype, f'val {epoch}', memory_format)
            record.update({f'val_{k}': v for k, v in metrics.items()})
            if model_ema is not None and args.model_ema_eval:
                ema_metrics, _, _ = evaluate(model_ema.module, val_loader, device, val_set.frame, args.conf,
                                             args.soft_label_ratio, args.use_amp, args.amp_dtype, 'val ema',
                                             memory_format)
                record.update({f'val_ema_{k}': v for k, v in ema_metrics.items()})
        # without a validation split the last epoch counts as the best
        value = metrics.get(args.best_metric, float('nan'))
        improved = is_better(args.best_metric, value, state['best_metric']) if metrics else True
        if improved:
            state.update(best_metric=value if metrics else None, best_epoch=epoch, stale_epochs=0)
        else:
            state['stale_epochs'] += 1
        record['time_s'] = round(time.time() - t0, 1)
        record['data_time_s'] = round(stats['data_time'], 1)
        if main_proc:
            for k, v in record.items():
                if k.startswith('val_') and isinstance(v, float) and np.isfinite(v):
                    writer.add_scalar(f'val/{k[4:]}', v, epoch)
            writer.add_scalar('train/epoch_loss', stats['loss'], epoch)
            writer.flush()
            if improved:
                save_checkpoint(out / 'checkpoint-best.pth', model, optimizer, lr_scheduler, scaler, model_ema,
                                epoch, state, args)
            save_checkpoint(out / 'checkpoint-last.pth', model, optimizer, lr_scheduler, scaler, model_ema, epoch,
                            state, args)
            with open(out / 'log.txt', 'a') as f:
                f.write(json.dumps(record) + '\n')
            best = state['best_metric']
            print(f'epoch {epoch + 1}/{args.epochs} loss {stats["loss"]:.4f} | val {format_metrics(metrics)} | '
                  f'best {args.best_metric} {best if best is None else round(best, 4)} '
                  f'(epoch {state["best_epoch"] + 1}) | {record["time_s"]:.0f}s', flush=True)
        if args.early_stop and state['stale_epochs'] >= args.early_stop_epoch:
            if main_proc:
                print(f'early stop: no better val {args.best_metric} for {args.early_stop_epoch} epochs')
            break
    if writer is not None:
        writer.close()

    summary = {'epochs_run': epoch + 1, 'best_epoch': state['best_epoch'] + 1, 'best_metric': args.best_metric,
               'best_value': state['best_metric'], 'skipped_images': state['skipped_images']}
    barrier()  # checkpoint-best.pth is complete on disk
    if args.test and len(splits['test']) and (out / 'checkpoint-best.pth').is_file():
        model.load_state_dict(read_checkpoint(out / 'checkpoint-best.pth')['model'])
        test_set = make_dataset(splits['test'], args, False, cache)
        test_metrics, _, _ = evaluate(model, make_loader(test_set, args, device, False), device, test_set.frame,
                                      args.conf, args.soft_label_ratio, args.use_amp, args.amp_dtype, 'test',
                                      memory_format)
        summary['test'] = test_metrics
        if main_proc:
            atomic_write_json(test_metrics, out / 'metrics.json')
            print(f'test (best checkpoint, epoch {state["best_epoch"] + 1}): {format_metrics(test_metrics)}')
    if main_proc:
        if state['skipped_images']:
            print(f'warning: {state["skipped_images"]} unreadable image(s) skipped (see the log)')
        atomic_write_json(summary, out / 'finished.json')
    return summary


def load_for_inference(path, args, explicit):
    """Build the model a checkpoint was trained as and load its weights.

    Architecture and preprocessing flags come from the checkpoint's saved args unless given on the command line.

    Returns:
        (model on CPU in eval mode, argparse.Namespace of the effective flags).

    Raises:
        DataError: unreadable checkpoint or weights of another architecture.
    """
    ckpt = read_checkpoint(path)
    saved = ckpt.get('args', {}) if isinstance(ckpt, dict) else {}
    run_args = argparse.Namespace(**vars(args))
    for k in CHECKPOINT_FLAGS:
        if k in saved and k not in explicit:
            setattr(run_args, k, saved[k])
    model = build_model(run_args)
    key = 'model_ema' if 'model_ema' in args.model_key.split('|')[0] and ckpt.get('model_ema') else 'model'
    if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
        load_model_state(model, ckpt[key], path)
    else:
        load_pretrained(model, path, args.model_key)
    return model.eval(), run_args


def run_eval(args, explicit):
    """--eval: metrics of one checkpoint on --eval_data_path (its --eval_split); writes metrics.json."""
    if not args.resume:
        raise DataError('--eval True needs --resume CHECKPOINT')
    device = resolve_device(args.device)
    model, run_args = load_for_inference(args.resume[0], args, explicit)
    data = args.eval_data_path or (args.data_path[0] if args.data_path else None)
    if not data:
        raise DataError('--eval True needs --eval_data_path (or --data_path)')
    frame = main_first(lambda: load_eval_frame(data, args.eval_split, run_args.test_val_ratio, split_seed(run_args),
                                               run_args.label_list))
    dataset = main_first(lambda: make_dataset(frame, run_args, False, eval_cache(data, run_args, len(frame))))
    model, memory_format = prepare_model(model, run_args, device)
    metrics, _, _ = evaluate(model, make_loader(dataset, run_args, device, False), device, dataset.frame,
                             args.conf, run_args.soft_label_ratio, args.use_amp, args.amp_dtype, 'eval', memory_format)
    if not metrics.get('n'):
        raise DataError(f'{data}: no labelled image to evaluate; use --pred True for unlabelled images')
    out = Path(args.output_dir) if 'output_dir' in explicit else \
        Path(args.resume[0]).parent / 'eval' / f'{Path(data).resolve().name}_{args.eval_split}'
    if is_main_process():
        atomic_write_json(metrics, out / 'metrics.json')
        print(f'{data} ({args.eval_split}, {metrics["n"]} images): {format_metrics(metrics)}')
        print(f'metrics: {out / "metrics.json"}')
    return metrics


def eval_cache(data, run_args, n_images):
    """Image cache for evaluation/prediction: the split's cache file when the data is a prepared root, else none
    (one pass over a plain folder gains nothing from a cache)."""
    folder = cache_folder(data, run_args)
    return make_cache(run_args, n_images, folder) if folder is not None else None


def run_pred(args, explicit):
    """--pred: predictions.csv, sorted copies and graphs for one or several checkpoints."""
    if not args.resume:
        raise DataError('--pred True needs --resume CHECKPOINT [CHECKPOINT ...]')
    data = args.eval_data_path or (args.data_path[0] if args.data_path else None)
    if not data:
        raise DataError('--pred True needs --eval_data_path')
    device = resolve_device(args.device)
    out_root = Path(args.pred_save_path or Path(args.output_dir) / 'pred')
    groups = [args.resume] if args.several_models else [[c] for c in args.resume]
    outs = [out_root if len(groups) == 1 else out_root / Path(g[0]).parent.name / Path(g[0]).stem for g in groups]
    held = [str(o) for o in outs if (o / 'predictions.csv').exists()]
    if held:
        raise DataError(f'{held[0]}: already holds a prediction report; choose another --pred_save_path')
    results = []
    for group, out in zip(groups, outs):
        probs_sum, indices, nb_classes, frame, run_args = None, None, None, None, None
        for path in group:
            model, run_args = load_for_inference(path, args, explicit)
            if nb_classes is not None and run_args.nb_classes != nb_classes:
                raise DataError(f'{path}: --several_models needs checkpoints with the same --nb_classes')
            nb_classes = run_args.nb_classes
            if frame is None:
                frame = main_first(lambda: load_eval_frame(data, args.eval_split, run_args.test_val_ratio,
                                                           split_seed(run_args), run_args.label_list))
            dataset = main_first(lambda: make_dataset(frame, run_args, False,
                                                      eval_cache(data, run_args, len(frame))))
            model, memory_format = prepare_model(model, run_args, device)
            probs, idx = predict_probs(model, make_loader(dataset, run_args, device, False), device, args.use_amp,
                                       args.amp_dtype, f'predict {Path(path).name}', memory_format)
            if indices is not None and not np.array_equal(idx, indices):
                raise DataError(f'{path}: models saw different images (a corrupt image?); predict them one by one')
            probs_sum, indices = (probs if probs_sum is None else probs_sum + probs), idx
        if not is_main_process():
            continue
        report = write_prediction_report(frame, probs_sum / len(group), indices, nb_classes, out, args.conf,
                                         run_args.soft_label_ratio, args.pred_save, args.pred_save_with_conf,
                                         args.pred_eval, args.pred_eval_name)
        if report['metrics'].get('n'):
            atomic_write_json(report['metrics'], out / 'metrics.json')
            print(f'{data} ({len(report["table"])} images): {format_metrics(report["metrics"])}')
        if report['metrics']['skipped']:
            print(f'warning: {report["metrics"]["skipped"]} unreadable image(s) skipped')
        print(f'prediction report: {out} (predictions.csv' + (', images/' if args.pred_save else '') +
              (', graphs/' if report['graphs'] else '') + ')')
        results.append(report)
    return results


def main(argv=None):
    """Entry point; returns the result of the chosen mode. Bad input exits with a one-line error (status 1)."""
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    explicit = explicit_flags(argv)
    check_args(args)
    try:
        if args.pred:
            return run_pred(args, explicit)
        if args.eval:
            return run_eval(args, explicit)
        if args.pretrain:
            import pretrain
            return pretrain.run(args)
        return train(args)
    finally:
        cleanup()


if __name__ == '__main__':
    run_cli(main, 'interrupted: checkpoint-last.pth holds the last finished epoch; continue with --auto_resume True')
