"""FCMAE self-supervised pretraining of a ConvNeXt V2 encoder on your own unlabelled images (``main.py --pretrain``).

    python main.py --pretrain True --data_path data/elpv --model convnextv2_atto --epochs 20 \
        --output_dir output/fcmae
    python main.py --data_path data/elpv --model convnextv2_atto --finetune output/fcmae/encoder.pth ...

Images: a prepared root or split folder gives its training split only (so test images stay unseen); any other
folder gives every image below it, class folders or not. Labels are ignored. Each epoch writes
``checkpoint-last.pth`` (full state, for ``--auto_resume``), ``encoder.pth`` (the encoder in timm format, key
``model``, for ``--finetune``), a JSON line in ``log.txt`` and TensorBoard scalars; all files atomically.
"""
import json
import logging
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from datasets import is_split_folder, load_splits
from distributed import is_main_process
from engine import autocast_context
from models.fcmae import FCMAE
from preprocess_data import scan_plain_folder
from utils import DataError, atomic_torch_save, atomic_write_json, seed_everything

log = logging.getLogger('pretrain')


def pretrain_frame(data_path, args):
    """Images to pretrain on from one data path (see the module docstring), as a list with absolute paths."""
    path = Path(data_path)
    if not path.exists():
        raise DataError(f'{path}: data path does not exist')
    if is_split_folder(path) or (path / 'list.csv').is_file():
        from main import split_seed
        return load_splits([path], args.test_val_ratio, split_seed(args), args.label_list)['train'][['path']]
    frame = scan_plain_folder(path)
    return frame.assign(path=[str((path / p).resolve()) for p in frame['path']])


def pretrain_one_epoch(model, loader, optimizer, device, epoch, lr_scheduler, use_amp=False, amp_dtype='bfloat16',
                       writer=None, memory_format=torch.contiguous_format):
    """One epoch of FCMAE: masked reconstruction loss, AdamW step, per-step LR schedule (timm).

    Batches are (float32 images [B, C, H, W], labels (ignored), indices) or None when all their images were skipped.

    Returns:
        dict: loss (mean over batches), lr (last), images.
    """
    model.train()
    n_batches = len(loader)
    losses, seen = [], 0
    for it, batch in enumerate(tqdm(loader, desc=f'pretrain {epoch}', leave=False, mininterval=1.0, disable=None)):
        if batch is None:
            continue
        images = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        with autocast_context(device, use_amp, amp_dtype):
            loss, _, _ = model(images)
        loss_value = loss.item()  # one device sync per step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f'FCMAE loss is {loss_value} at epoch {epoch}, step {it}; lower --lr')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step = epoch * n_batches + it
        lr_scheduler.step_update(num_updates=step + 1)
        losses.append(loss_value)
        seen += len(images)
        if writer is not None:
            writer.add_scalar('pretrain/loss', loss_value, step)
            writer.add_scalar('pretrain/lr', optimizer.param_groups[0]['lr'], step)
    return {'loss': sum(losses) / max(1, len(losses)), 'lr': optimizer.param_groups[0]['lr'], 'images': seen}


def run(args):
    """Pretrain an FCMAE on the images of ``args.data_path``; returns the summary written to finished.json."""
    import main as cli
    from torch.utils.tensorboard import SummaryWriter
    cli.check_output_dir(args)
    if not args.data_path:
        raise DataError('--data_path is required to pretrain')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise DataError('--pretrain True runs in one process; start it with python, not torchrun')
    if args.input_size % 32:
        raise DataError(f'--input_size must be a multiple of 32 for FCMAE, got {args.input_size}')
    out = Path(args.output_dir)
    resume, finished = cli.resume_point(args)
    if finished is not None:
        return finished
    device = cli.resolve_device(args.device)
    seed_everything(args.seed)
    frame = pd.concat([pretrain_frame(p, args) for p in args.data_path], ignore_index=True)
    cache = cli.make_cache(args, len(frame), cli.cache_folder(args.data_path[0], args))
    dataset = cli.make_dataset(frame, args, True, cache)
    loader = cli.make_loader(dataset, args, device, True)
    try:
        model = FCMAE(args.model, args.in_chans, args.mask_ratio, args.decoder_depth, args.decoder_embed_dim,
                      args.norm_pix_loss, args.drop_path)
    except ValueError as e:
        raise DataError(f'--model {args.model}: {e}') from None
    run_model, memory_format = cli.prepare_model(model, args, device)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    betas=(0.9, 0.95))
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, step_on_epochs=False,
                                          updates_per_epoch=max(1, len(loader)))
    log.info(f'FCMAE {args.model}: {len(dataset)} images, mask ratio {args.mask_ratio}, decoder '
             f'{args.decoder_depth} x {args.decoder_embed_dim}, {len(loader)} steps per epoch on {device}')
    start_epoch = 0
    if resume:
        ckpt = cli.read_checkpoint(resume)
        cli.load_model_state(model, ckpt['model'], resume)
        optimizer.load_state_dict(ckpt['optimizer'])
        lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        start_epoch = ckpt['epoch'] + 1
        log.info(f'resumed from {resume} at epoch {start_epoch}')
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(vars(args), out / 'args.json')
    writer = SummaryWriter(str(Path(args.log_dir or args.output_dir) / args.log_name)) if is_main_process() else None
    encoder_args = {k: getattr(args, k) for k in ('model', 'in_chans', 'input_size', 'normalize', 'drop_path')}
    stats = {'loss': float('nan')}
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        seed_everything(args.seed + epoch)
        loader.generator.manual_seed(args.seed + epoch)
        stats = pretrain_one_epoch(run_model, loader, optimizer, device, epoch, lr_scheduler, args.use_amp,
                                   args.amp_dtype, writer, memory_format)
        lr_scheduler.step(epoch + 1)
        cli.save_checkpoint(out / 'checkpoint-last.pth', model, optimizer, lr_scheduler, None, None, epoch, {}, args)
        atomic_torch_save({'model': model.encoder_state_dict(), 'epoch': epoch, 'args': encoder_args},
                          out / 'encoder.pth')
        record = {'epoch': epoch, 'pretrain_loss': stats['loss'], 'lr': stats['lr'], 'images': stats['images'],
                  'time_s': round(time.time() - t0, 1)}
        with open(out / 'log.txt', 'a') as f:
            f.write(json.dumps(record) + '\n')
        if writer is not None:
            writer.add_scalar('pretrain/epoch_loss', stats['loss'], epoch)
            writer.flush()
        print(f'pretrain epoch {epoch + 1}/{args.epochs} loss {stats["loss"]:.4f} | {record["time_s"]:.0f}s',
              flush=True)
    if writer is not None:
        writer.close()
    summary = {'epochs_run': args.epochs, 'last_loss': stats['loss'], 'encoder': str(out / 'encoder.pth')}
    atomic_write_json(summary, out / 'finished.json')
    print(f'encoder: {out / "encoder.pth"} (use it with --finetune)')
    return summary
