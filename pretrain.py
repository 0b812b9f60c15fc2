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

from budget import TimeBudget
from checkpoint import check_output_dir, restore_checkpoint, resume_point, save_checkpoint, trim_log
from datasets import is_split_folder, load_splits
from engine import build_lr_scheduler, build_optimizer, warm_up_excess
from models.fcmae import FCMAE
from preprocess_data import scan_plain_folder
from runlog import RunLog
from runtime import cache_folder, device_settings, make_cache, make_dataset, make_loader, prepare_model, \
    resolve_device, seed_loader, settle_workers, split_seed
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
        dict: loss (mean over batches), lr (last), images, warmup_s (``engine.warm_up_excess`` of the steps'
        seconds).

    Raises:
        utils.TrainingDiverged: a non-finite loss (names the epoch, step and learning rate).
    """
    model.train()
    n_batches = len(loader)
    losses, seen, step_times, t_step = [], 0, [], time.perf_counter()
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
        step_times.append(time.perf_counter() - t_step)
        t_step = time.perf_counter()
    return {'loss': sum(losses) / max(1, len(losses)), 'lr': optimizer.param_groups[0]['lr'], 'images': seen,
            'warmup_s': warm_up_excess(step_times)}


def run(args):
    """Pretrain an FCMAE on the images of ``args.data_path``; returns the summary written to finished.json.

    Raises:
        DataError: no --data_path, started under torchrun, a model that is not ConvNeXt V2, bad data, or a resume
            checkpoint that is not an FCMAE one.
    """
    t_run = time.time()
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
    device = resolve_device(args.device)
    loader = make_loader(dataset, args, device, True)
    dev = device_settings(args, device, build, steps=args.epochs * len(loader))  # precision and --compile
    settle_workers(args, dev, dataset, build, args.epochs)  # --num_workers -1
    loader = make_loader(dataset, args, device, True)
    run_model = prepare_model(model, args, dev)
    optimizer, lr_scheduler = build_optimizer(model, args, len(loader), betas=(0.9, 0.95), layer_decay=None)
    log.info(f'FCMAE {args.model}: {len(dataset)} images, mask ratio {args.mask_ratio}, decoder '
             f'{args.decoder_depth} x {args.decoder_embed_dim}, {len(loader)} steps per epoch on {dev.device}')

    # restore
    start_epoch, state = 0, {'time_budget': None}
    if resume:
        start_epoch, saved = restore_checkpoint(resume, 'fcmae', model, optimizer, lr_scheduler=lr_scheduler)
        state.update({k: saved[k] for k in state if k in saved})
    budget = TimeBudget(args.time_budget, args.epochs, state['time_budget'], resume, t_run)
    args.epochs = budget.length
    trim_log(out / 'log.txt', start_epoch)  # also a first epoch logged by a run killed before its first checkpoint

    # epoch loop
    runlog = RunLog(args, start_epoch, len(loader))
    try:  # logs flushed and closed on any exit
        encoder_args = {k: getattr(args, k) for k in ('model', 'in_chans', 'input_size', 'normalize', 'drop_path')}
        stats = {'loss': float('nan')}
        for epoch in range(start_epoch, budget.most):  # ends at budget.length
            t0 = time.time()
            seed_everything(args.seed + epoch)
            seed_loader(loader, args.seed, epoch)
            stats = pretrain_one_epoch(run_model, loader, optimizer, dev, epoch, lr_scheduler, runlog)
            lr_scheduler.step(epoch + 1)
            lr_scheduler = budget.end_epoch(epoch + 1, time.time() - t0 - stats['warmup_s'], 0.0, lr_scheduler,
                                            lambda n: build_lr_scheduler(optimizer, args, len(loader), n,
                                                                         (epoch + 1) * len(loader)))
            args.epochs, state['time_budget'] = budget.length, budget.state()
            record = {'epoch': epoch, 'pretrain_loss': stats['loss'], 'lr': stats['lr'], 'images': stats['images'],
                      'time_s': round(time.time() - t0, 1)}
            runlog.epoch(record, {'pretrain/epoch_loss': stats['loss']})
            save_checkpoint(out / 'checkpoint-last.pth', 'fcmae', model, optimizer, epoch, args,
                            lr_scheduler=lr_scheduler, state=state)
            atomic_torch_save({'model': model.encoder_state_dict(), 'epoch': epoch, 'args': encoder_args},
                              out / 'encoder.pth')
            print(f'pretrain epoch {epoch + 1}/{args.epochs} loss {stats["loss"]:.4f} | {record["time_s"]:.0f}s',
                  flush=True)
            if epoch + 1 >= args.epochs:  # the length --time_budget fixed, shortened or lengthened
                break
    finally:
        runlog.close()
    summary = {'epochs_run': args.epochs, 'last_loss': stats['loss'], 'encoder': str(out / 'encoder.pth')}
    atomic_write_json(summary, out / 'finished.json')
    print(f'encoder: {out / "encoder.pth"} (use it with --finetune)')
    return summary
