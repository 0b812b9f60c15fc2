"""FCMAE self-supervised pretraining of a ConvNeXt V2 encoder on your own unlabelled images (``main.py --pretrain``).

    python main.py --pretrain True --data_path data/elpv --model convnextv2_atto --epochs 20 \
        --output_dir output/fcmae
    python main.py --data_path data/elpv --model convnextv2_atto --finetune output/fcmae/encoder.pth ...

Images: a prepared root or split folder gives its training split only (so test images stay unseen); any other
folder gives every image below it, class folders or not. Labels are ignored. Each epoch writes
``checkpoint-last.pth`` (full state, for ``--auto_resume``), ``encoder.pth`` (the encoder in timm format, key
``model``, for ``--finetune``), a JSON line in ``log.txt`` and TensorBoard scalars; all files atomically.
"""
import logging
import os
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from checkpoint import check_output_dir, restore_checkpoint, resume_point, save_checkpoint, trim_log
from datasets import is_split_folder, load_splits
from engine import build_optimizer
from models.fcmae import FCMAE
from precision import choose_compile
from preprocess_data import scan_plain_folder
from runlog import RunLog
from runtime import cache_folder, device_settings, make_cache, make_dataset, make_loader, prepare_model, seed_loader, \
    split_seed
from utils import DataError, atomic_torch_save, atomic_write_json, check_finite_loss, seed_everything

log = logging.getLogger('pretrain')


def pretrain_frame(data_path, args):
    """Images to pretrain on from one data path (see the module docstring), as a list with absolute paths.

    Raises:
        DataError: a missing path, a bad list, or a folder without images.
    """
    path = Path(data_path)
    if not path.exists():
        raise DataError(f'{path}: data path does not exist')
    if is_split_folder(path) or (path / 'list.csv').is_file():
        return load_splits([path], args.test_val_ratio, split_seed(args), args.label_list)['train'][['path']]
    frame = scan_plain_folder(path)
    return frame.assign(path=[str((path / p).resolve()) for p in frame['path']])


def pretrain_one_epoch(model, loader, optimizer, dev, epoch, lr_scheduler, writer=None):
    """One epoch of FCMAE: masked reconstruction loss, optimizer step, per-step LR schedule (timm).

    Batches are (float32 images [B, C, H, W], labels (ignored), indices) or None when all their images were skipped.

    Args:
        model: ``models.fcmae.FCMAE`` (or its compiled wrapper). dev: ``engine.DeviceSettings``.
        writer: optional object with SummaryWriter's ``add_scalar(tag, value, step)`` (a runlog.RunLog or a
            SummaryWriter) for pretrain/loss and pretrain/lr per step.

    Returns:
        dict: loss (mean over batches), lr (last), images.

    Raises:
        utils.TrainingDiverged: a non-finite loss (names the epoch, step and learning rate).
    """
    model.train()
    n_batches = len(loader)
    losses, seen = [], 0
    for it, batch in enumerate(tqdm(loader, desc=f'pretrain {epoch}', leave=False, mininterval=1.0, disable=None)):
        if batch is None:
            continue
        images = dev.inputs(batch[0])
        with dev.autocast():
            loss, _, _ = model(images)
        loss_value = check_finite_loss(loss.item(), epoch, it, optimizer.param_groups[0]['lr'], 'FCMAE loss')
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
    """Pretrain an FCMAE on the images of ``args.data_path``; returns the summary written to finished.json.

    Raises:
        DataError: no --data_path, started under torchrun, a model that is not ConvNeXt V2, bad data, or a resume
            checkpoint that is not an FCMAE one.
    """
    check_output_dir(args)
    if not args.data_path:
        raise DataError('--data_path is required to pretrain')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise DataError('--pretrain True runs in one process; start it with python, not torchrun')
    out = Path(args.output_dir)
    resume, finished = resume_point(args)
    if finished is not None:
        return finished
    seed_everything(args.seed)

    # build: data, model, optimisation
    frame = pd.concat([pretrain_frame(p, args) for p in args.data_path], ignore_index=True)
    cache = make_cache(args, len(frame), cache_folder(args.data_path[0], args))
    dataset = make_dataset(frame, args, True, cache)

    def build():
        return FCMAE(args.model, args.in_chans, args.mask_ratio, args.decoder_depth, args.decoder_embed_dim,
                     args.norm_pix_loss, args.drop_path)

    try:
        model = build()
    except ValueError as e:
        raise DataError(f'--model {args.model}: {e}') from None
    dev = device_settings(args, build=build)
    loader = make_loader(dataset, args, dev.device, True)
    args.compile = choose_compile(args, dev, build, args.epochs * len(loader))
    run_model = prepare_model(model, args, dev)
    optimizer, lr_scheduler = build_optimizer(model, args, len(loader), betas=(0.9, 0.95), layer_decay=None)
    log.info(f'FCMAE {args.model}: {len(dataset)} images, mask ratio {args.mask_ratio}, decoder '
             f'{args.decoder_depth} x {args.decoder_embed_dim}, {len(loader)} steps per epoch on {dev.device}')

    # restore
    start_epoch = 0
    if resume:
        start_epoch, _ = restore_checkpoint(resume, 'fcmae', model, optimizer, lr_scheduler=lr_scheduler)
    trim_log(out / 'log.txt', start_epoch)  # also a first epoch logged by a run killed before its first checkpoint

    # epoch loop
    runlog = RunLog(args, start_epoch, len(loader))
    try:  # logs flushed and closed on any exit
        encoder_args = {k: getattr(args, k) for k in ('model', 'in_chans', 'input_size', 'normalize', 'drop_path')}
        stats = {'loss': float('nan')}
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            seed_everything(args.seed + epoch)
            seed_loader(loader, args.seed, epoch)
            stats = pretrain_one_epoch(run_model, loader, optimizer, dev, epoch, lr_scheduler, runlog)
            lr_scheduler.step(epoch + 1)
            record = {'epoch': epoch, 'pretrain_loss': stats['loss'], 'lr': stats['lr'], 'images': stats['images'],
                      'time_s': round(time.time() - t0, 1)}
            runlog.epoch(record, {'pretrain/epoch_loss': stats['loss']})
            save_checkpoint(out / 'checkpoint-last.pth', 'fcmae', model, optimizer, epoch, args,
                            lr_scheduler=lr_scheduler)
            atomic_torch_save({'model': model.encoder_state_dict(), 'epoch': epoch, 'args': encoder_args},
                              out / 'encoder.pth')
            print(f'pretrain epoch {epoch + 1}/{args.epochs} loss {stats["loss"]:.4f} | {record["time_s"]:.0f}s',
                  flush=True)
    finally:
        runlog.close()
    summary = {'epochs_run': args.epochs, 'last_loss': stats['loss'], 'encoder': str(out / 'encoder.pth')}
    atomic_write_json(summary, out / 'finished.json')
    print(f'encoder: {out / "encoder.pth"} (use it with --finetune)')
    return summary
