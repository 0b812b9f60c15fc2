"""Train, evaluate and predict with ConvNeXt on defect images with soft labels.

    python main.py --data_path data/elpv --model convnext_atto --nb_classes 2 --use_softlabel True \
        --output_dir output/elpv
    python main.py --eval True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv
    python main.py --pred True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv \
        --pred_save_path output/elpv/pred --pred_save True --pred_eval True

This file is the command line and the wiring: it parses and checks the flags, then runs one mode as a short
sequence of steps whose rules live in the modules it calls (runtime, checkpoint, engine, datasets, models).
"""
import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path

from timm.utils import ModelEmaV3

from checkpoint import check_output_dir, restore_checkpoint, resume_point, save_checkpoint, trim_log
import pretrain
from config import parse_with_config
from distributed import barrier, cleanup, is_main_process, world_size
from distributed import rank as get_rank
from engine import (build_loss, build_optimizer, evaluate, format_metrics, frame_metrics, train_one_epoch,
                    write_prediction_report)
from imaging import PADDING_MODES
from labels import check_ratio, head_classes, parse_label_list
from metrics import is_better
from models import build_model, check_input_size, load_pretrained, read_checkpoint, resnet_roadmap
from predict import predict_checkpoint, predict_ensemble
from runlog import RunLog
from runtime import (device_settings, load_training_data, make_dataset, make_loader, prepare_model, resolve_device,
                     seed_loader)
from softLabelLoss import LOSS_FUNCTIONS
from utils import DataError, atomic_write_json, folder_lock, run_cli, seed_everything, str2bool, str2bool_or_auto

log = logging.getLogger('main')


def add_model_flags(p):
    """Flags of the model group."""
    g = p.add_argument_group('model')
    g.add_argument('--model', default='convnext_atto',
                   help='any timm ConvNeXt V1/V2 name, convnext_isotropic_*, or resnet (the ResNet-to-ConvNeXt roadmap)')
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


def add_roadmap_flags(p):
    """Flags of the ResNet-50 to ConvNeXt-T roadmap (Liu et al. 2022, figure 2; models/resnet_roadmap.py)."""
    g = p.add_argument_group('ResNet-to-ConvNeXt roadmap (--model resnet; defaults: ResNet-50; each step adds a flag)')
    g.add_argument('--resnet_layers', default='3-4-6-3', help='blocks per stage; 3-3-9-3 is the stage-ratio step')
    g.add_argument('--resnet_stem', default='resnet', choices=['resnet', 'patch_embed'],
                   help='7x7 conv + max-pool, or the 4x4 stride-4 patchify stem')
    g.add_argument('--resnet_depthwise', type=str2bool, default=False, help='depthwise spatial conv (ResNeXt-ify)')
    g.add_argument('--resnet_embed_dim', type=int, default=64, help='first-stage width (96 in ConvNeXt-T)')
    g.add_argument('--resnet_block', default='bottleneck', choices=['bottleneck', 'inverted'])
    g.add_argument('--resnet_conv_first', type=str2bool, default=False, help='spatial conv at the start of the block')
    g.add_argument('--resnet_kernel_size', type=int, default=3)
    g.add_argument('--resnet_act_layer', default='relu', choices=['relu', 'gelu'])
    g.add_argument('--resnet_del_act', type=str2bool, default=False, help='one activation per block')
    g.add_argument('--resnet_reorg_norm', type=str2bool, default=False, help='one norm per block')
    g.add_argument('--resnet_norm_layer', default='bn', choices=['bn', 'ln'])
    g.add_argument('--resnet_final_norm', type=str2bool, default=False, help='norm on the pooled features')
    g.add_argument('--resnet_sep_downsample', type=str2bool, default=False,
                   help='separate downsampling layers and layer scale: ConvNeXt-T with all the flags before')


def add_optimisation_flags(p):
    """Flags of the optimisation group."""
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


def add_augmentation_flags(p):
    """Flags of the augmentation group."""
    g = p.add_argument_group('augmentation')
    g.add_argument('--normalize', default='per_image', choices=['per_image', 'imagenet'],
                   help='per_image: zero mean, unit variance per image; imagenet: ImageNet mean/std')
    g.add_argument('--scale', type=float, nargs=2, default=[0.8, 1.0],
                   help="RandomResizedCrop area range (timm's ImageNet 0.08 1 shrinks thin defects out of sight)")
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.5, help='defect images have no up or down')
    g.add_argument('--rot90', type=float, default=0.0, help='probability of a random 90/180/270-degree turn')
    g.add_argument('--rotation', type=float, default=0.0, help='random rotation within +-DEG degrees')
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


def add_soft_label_flags(p):
    """Flags of the soft labels group."""
    g = p.add_argument_group('soft labels')
    g.add_argument('--use_softlabel', type=str2bool, default=False)
    g.add_argument('--soft_label_ratio', type=float, default=0.7, help='r: weight an ambiguous label keeps')
    g.add_argument('--label_ratio', type=float, default=1.0, help='q: weight a certain label keeps')
    g.add_argument('--soft_type', type=int, default=1, choices=[1, 2])
    g.add_argument('--lossfn', default='CE', choices=LOSS_FUNCTIONS)
    g.add_argument('--class_weight', default='none', choices=['none', 'balanced'],
                   help='balanced: per-label loss weights n / (4 n_label) from the training counts (shifts P(defect) '
                        'away from the data\'s prior, so it costs calibration)')


def add_data_flags(p):
    """Flags of the data group."""
    g = p.add_argument_group('data')
    g.add_argument('--data_path', nargs='+', default=None, help='prepared roots or split folders (union)')
    g.add_argument('--eval_data_path', default=None, help='data for --eval/--pred (default: first --data_path)')
    g.add_argument('--eval_split', default='test', choices=['train', 'val', 'test', 'all'])
    g.add_argument('--test_val_ratio', type=float, nargs=2, default=[0.2, 0.1], metavar=('TEST', 'VAL'))
    g.add_argument('--label_list', nargs='*', default=None, help='map folder names to labels: crack=pos ok=neg')
    g.add_argument('--upsample', type=float, nargs=4, default=None, metavar=('AMB_NEG', 'AMB_POS', 'NEG', 'POS'))
    g.add_argument('--use_bbox', type=str2bool, default=False)
    g.add_argument('--padding', default='PIXEL', choices=PADDING_MODES)
    g.add_argument('--padding_size', type=float, default=0, help='pixels (rounded to whole pixels)')
    g.add_argument('--use_shift', type=str2bool, default=False, help='random crop shift at train time')
    g.add_argument('--strict_images', type=str2bool, default=False, help='stop on a corrupt image')
    g.add_argument('--num_workers', type=int, default=-1,
                   help='DataLoader workers per process; -1: CPU cores per process minus one, at most 8')
    g.add_argument('--pin_mem', type=str2bool, default=True, help='pinned memory (CUDA only)')
    g.add_argument('--cache', default='auto', choices=['auto', 'memory', 'file', 'none'],
                   help='decode and resize images once: memory, file (memory plus a file beside the split), '
                        'none; auto = file when the images fit in a quarter of the free memory')


def add_run_flags(p):
    """Flags of the run group."""
    g = p.add_argument_group('run')
    g.add_argument('--config', default=None,
                   help='YAML run config: flag names to values, read as defaults (the command line wins); each run '
                        'saves its effective flags as OUTPUT/config.yaml')
    g.add_argument('--output_dir', default='output')
    g.add_argument('--log_dir', default=None, help='TensorBoard root (default: --output_dir)')
    g.add_argument('--log_name', default='tensorboard')
    g.add_argument('--enable_wandb', type=str2bool, default=False,
                   help='also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)')
    g.add_argument('--project', default='convnext-softlabel', help='W&B project')
    g.add_argument('--wandb_ckpt', type=str2bool, default=False,
                   help='upload checkpoint-best.pth (each new best) and checkpoint-last.pth (at the end) to W&B')
    g.add_argument('--best_metric', default='auroc', help='validation metric choosing checkpoint-best.pth')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    g.add_argument('--seed', type=int, default=0, help='training seed (and split seed unless --split_seed)')
    g.add_argument('--split_seed', type=int, default=None, help='seed of the train/val/test split (default --seed)')
    g.add_argument('--resume', nargs='+', default=None, help='checkpoint(s): continue training, or --eval/--pred')
    g.add_argument('--auto_resume', type=str2bool, default=False, help='continue from OUTPUT/checkpoint-last.pth')
    g.add_argument('--use_amp', type=str2bool_or_auto, default='auto',
                   help='bf16 autocast on CPU, bf16 (fp16 where unsupported) on CUDA; auto: measured per machine')
    g.add_argument('--amp_dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    g.add_argument('--channels_last', type=str2bool_or_auto, default='auto',
                   help='NHWC memory format; auto: measured per machine with --use_amp')
    g.add_argument('--compile', type=str2bool, default=False, help='torch.compile the model (eager on failure)')
    g.add_argument('--early_stop', type=str2bool, default=False)
    g.add_argument('--early_stop_epoch', type=int, default=10, help='epochs without improvement before stopping')
    g.add_argument('--eval', type=str2bool, default=False, help='evaluate --resume on --eval_data_path')
    g.add_argument('--test', type=str2bool, default=True, help='evaluate the best checkpoint on test after training')


def add_fcmae_flags(p):
    """Flags of the FCMAE pretraining (ConvNeXt V2, Woo et al. 2023) group."""
    g = p.add_argument_group('FCMAE pretraining (ConvNeXt V2, Woo et al. 2023)')
    g.add_argument('--pretrain', type=str2bool, default=False,
                   help='self-supervised FCMAE pretraining of --model (a convnextv2_* name) on the images')
    g.add_argument('--mask_ratio', type=float, default=0.6, help='fraction of 32x32 patches masked')
    g.add_argument('--decoder_depth', type=int, default=1)
    g.add_argument('--decoder_embed_dim', type=int, default=512)
    g.add_argument('--norm_pix_loss', type=str2bool, default=True, help='normalise each target patch')


def add_prediction_flags(p):
    """Flags of the prediction group."""
    g = p.add_argument_group('prediction')
    g.add_argument('--pred', type=str2bool, default=False, help='prediction mode')
    g.add_argument('--pred_save_path', default=None, help='prediction output folder')
    g.add_argument('--pred_save', type=str2bool, default=False, help='copy images sorted by true/predicted label')
    g.add_argument('--pred_save_with_conf', type=str2bool, default=False, help='prefix copies with P(defect)')
    g.add_argument('--pred_eval', type=str2bool, default=False, help='draw evaluation graphs')
    g.add_argument('--pred_eval_name', default='', help='prefix of the graph file names')
    g.add_argument('--conf', type=float, default=0.5, help='decision threshold on P(defect)')
    g.add_argument('--several_models', type=str2bool, default=False, help='average the --resume checkpoints')
    g.add_argument('--tta', type=str2bool, default=False,
                   help='test-time augmentation: average over the 8 flips and turns (test split, --eval, --pred)')


def get_args_parser():
    """All command-line flags of main.py (boolean flags take True/False), in argument groups."""
    p = argparse.ArgumentParser('ConvNeXt soft-label defect classifier', allow_abbrev=False)
    for add in (add_model_flags, add_roadmap_flags, add_optimisation_flags, add_augmentation_flags, add_soft_label_flags,
                add_data_flags, add_run_flags, add_fcmae_flags, add_prediction_flags):
        add(p)
    return p


def check_args(args):
    """Validate flag values; raises DataError with a one-line message naming the flag."""
    try:
        for name in ('soft_label_ratio', 'label_ratio', 'conf'):
            check_ratio(name, getattr(args, name))
        head_classes(args.nb_classes)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not 0 <= args.smoothing < 1:
        raise DataError(f'--smoothing must lie in [0, 1), got {args.smoothing}')
    if args.batch_size < 1 or args.epochs < 0 or args.update_freq < 1:
        raise DataError('--batch_size and --update_freq must be >= 1 and --epochs >= 0')
    if not 0 <= args.mask_ratio < 1:
        raise DataError(f'--mask_ratio must lie in [0, 1), got {args.mask_ratio}')
    if not args.padding_size >= 0:
        raise DataError(f'--padding_size must be >= 0 pixels, got {args.padding_size}')
    check_input_size(args.input_size)
    parse_label_list(args.label_list)
    if args.enable_wandb and importlib.util.find_spec('wandb') is None:
        raise DataError('--enable_wandb True needs the wandb package: pip install wandb')
    if args.model == 'resnet':
        try:
            resnet_roadmap.options_from_args(args)
        except ValueError as e:
            raise DataError(str(e)) from None


def validate(model, model_ema, data, dev, args, epoch):
    """Validation metrics of an epoch: (metrics dict, log entries val_* and, with --model_ema_eval, val_ema_*)."""
    if data.val_loader is None:
        return {}, {}
    metrics, _, _ = evaluate(model, data.val_loader, dev, data.val_set.frame, conf=args.conf,
                             soft_label_ratio=args.soft_label_ratio, desc=f'val {epoch}')
    entries = {f'val_{k}': v for k, v in metrics.items()}
    if model_ema is not None and args.model_ema_eval:
        ema_metrics, _, _ = evaluate(model_ema.module, data.val_loader, dev, data.val_set.frame, conf=args.conf,
                                     soft_label_ratio=args.soft_label_ratio, desc='val ema')
        entries.update({f'val_ema_{k}': v for k, v in ema_metrics.items()})
    return metrics, entries


def track_best(state, metric, metrics, epoch):
    """Update the best-epoch state with an epoch's validation metrics; True when the epoch is the new best.

    Without a validation split every epoch counts as the best (the last one is kept)."""
    value = metrics.get(metric, float('nan'))
    improved = is_better(metric, value, state['best_metric']) if metrics else True
    if improved:
        state.update(best_metric=value if metrics else None, best_epoch=epoch, stale_epochs=0)
    else:
        state['stale_epochs'] += 1
    return improved


def test_best(args, model, data, dev, state, epochs_run):
    """Evaluate checkpoint-best.pth on the test split (--test True); write metrics.json and finished.json.

    Returns:
        dict: the summary written to finished.json.
    """
    out = Path(args.output_dir)
    summary = {'epochs_run': epochs_run, 'best_epoch': state['best_epoch'] + 1, 'best_metric': args.best_metric,
               'best_value': state['best_metric'], 'skipped_images': state['skipped_images']}
    barrier()  # checkpoint-best.pth is complete on disk
    if args.test and len(data.splits['test']) and (out / 'checkpoint-best.pth').is_file():
        model.load_state_dict(read_checkpoint(out / 'checkpoint-best.pth')['model'])
        test_set = make_dataset(data.splits['test'], args, False, data.cache)
        metrics, _, _ = evaluate(model, make_loader(test_set, args, dev.device, False), dev, test_set.frame,
                                 conf=args.conf, soft_label_ratio=args.soft_label_ratio, desc='test',
                                 tta=args.tta)
        summary['test'] = metrics
        if is_main_process():
            atomic_write_json(metrics, out / 'metrics.json')
            print(f'test (best checkpoint, epoch {state["best_epoch"] + 1}): {format_metrics(metrics)}')
    if is_main_process():
        if state['skipped_images']:
            print(f'warning: {state["skipped_images"]} unreadable image(s) skipped (see the log)')
        atomic_write_json(summary, out / 'finished.json')
    return summary


def train(args):
    """Train with validation each epoch; write checkpoints, log.txt, TensorBoard events; test the best checkpoint.

    Under torchrun every process trains on its shard (DistributedDataParallel) and metrics are computed on the
    predictions gathered from all processes; only rank 0 writes files.

    Returns:
        dict: the summary written to finished.json.
    """
    check_output_dir(args)
    if not args.data_path:
        raise DataError('--data_path is required to train')
    out = Path(args.output_dir)
    resume, finished = resume_point(args)
    if finished is not None:
        return finished
    dev = device_settings(args)
    seed_everything(args.seed)

    # build: data, model, optimisation
    data = load_training_data(args, dev.device)
    model = build_model(args)
    if args.finetune:
        load_pretrained(model, args.finetune, args.model_key)
    run_model = prepare_model(model, args, dev)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    updates_per_epoch = max(1, len(data.train_loader) // args.update_freq)
    optimizer, lr_scheduler = build_optimizer(model, args, updates_per_epoch)
    scaler = dev.grad_scaler()
    criterion, mixup_fn = build_loss(args, data.train_set.frame, dev.device)
    log.info(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; '
             f'{world_size()} process(es) on {dev.device}, effective batch '
             f'{args.batch_size * args.update_freq * world_size()} ({args.batch_size} x {args.update_freq} '
             f'accumulation x {world_size()} processes), lr {args.lr:g}, {updates_per_epoch} updates per epoch, '
             f'{data.train_loader.num_workers} loader worker(s)')

    # restore
    state = {'best_metric': None, 'best_epoch': -1, 'stale_epochs': 0, 'skipped_images': 0}
    start_epoch = 0
    if resume:
        start_epoch, saved = restore_checkpoint(resume, 'classifier', model, optimizer, lr_scheduler=lr_scheduler,
                                                scaler=scaler, model_ema=model_ema)
        state.update({k: saved[k] for k in state if k in saved})
        trim_log(out / 'log.txt', start_epoch)

    # epoch loop
    runlog = RunLog(args, start_epoch, len(data.train_loader))
    try:  # logs flushed and closed on any exit, an error or Ctrl-C included
        epoch = start_epoch - 1
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            seed_everything(args.seed + epoch + 1000 * get_rank())  # same order and augmentation, resumed or not
            seed_loader(data.train_loader, args.seed, epoch)
            stats = train_one_epoch(run_model, criterion, data.train_loader, optimizer, dev, epoch,
                                    lr_scheduler=lr_scheduler, scaler=scaler, model_ema=model_ema,
                                    mixup_fn=mixup_fn, update_freq=args.update_freq, clip_grad=args.clip_grad,
                                    writer=runlog)
            lr_scheduler.step(epoch + 1)
            metrics, val_entries = validate(model, model_ema, data, dev, args, epoch)
            improved = track_best(state, args.best_metric, metrics, epoch)
            state['skipped_images'] = max(state['skipped_images'], stats['skipped'])
            record = {'epoch': epoch, 'train_loss': stats['loss'], 'lr': stats['lr'],
                      'train_images': stats['images'], **val_entries, 'time_s': round(time.time() - t0, 1),
                      'data_time_s': round(stats['data_time'], 1)}
            runlog.epoch(record, {'train/epoch_loss': stats['loss'],
                                  **{f'val/{k[4:]}': v for k, v in val_entries.items()}})
            if is_main_process():  # after the log line: a kill in between resumes here and trims the line
                parts = dict(lr_scheduler=lr_scheduler, scaler=scaler, model_ema=model_ema, state=state)
                if improved:
                    save_checkpoint(out / 'checkpoint-best.pth', 'classifier', model, optimizer, epoch, args,
                                    **parts)
                    runlog.checkpoint(out / 'checkpoint-best.pth', ['best', f'epoch-{epoch + 1}'])
                save_checkpoint(out / 'checkpoint-last.pth', 'classifier', model, optimizer, epoch, args, **parts)
                best = state['best_metric']
                print(f'epoch {epoch + 1}/{args.epochs} loss {stats["loss"]:.4f} | val {format_metrics(metrics)} | '
                      f'best {args.best_metric} {best if best is None else round(best, 4)} '
                      f'(epoch {state["best_epoch"] + 1}) | {record["time_s"]:.0f}s', flush=True)
            if args.early_stop and state['stale_epochs'] >= args.early_stop_epoch:
                if is_main_process():
                    print(f'early stop: no better val {args.best_metric} for {args.early_stop_epoch} epochs')
                break
        if epoch >= start_epoch:
            runlog.checkpoint(out / 'checkpoint-last.pth', ['latest'])
    finally:
        runlog.close()

    # test the best
    return test_best(args, model, data, dev, state, epoch + 1)


def eval_data(args):
    """The data folder of --eval/--pred: --eval_data_path, else the first --data_path.

    Raises:
        DataError: neither given, or no --resume checkpoint.
    """
    mode = '--pred True' if args.pred else '--eval True'
    if not args.resume:
        raise DataError(f'{mode} needs --resume CHECKPOINT')
    data = args.eval_data_path or (args.data_path[0] if args.data_path else None)
    if not data:
        raise DataError(f'{mode} needs --eval_data_path (or --data_path)')
    return data


def run_eval(args, explicit):
    """--eval: metrics of one checkpoint on --eval_data_path (its --eval_split); writes metrics.json."""
    data = eval_data(args)
    probs, indices, frame, run_args = predict_checkpoint(args.resume[0], data, args, explicit,
                                                         resolve_device(args.device))
    metrics = frame_metrics(frame, probs, indices, args.conf, run_args.soft_label_ratio)
    if not metrics.get('n'):
        raise DataError(f'{data}: no labelled image to evaluate; use --pred True for unlabelled images')
    out = Path(args.output_dir) if 'output_dir' in explicit else \
        Path(args.resume[0]).parent / 'eval' / f'{Path(data).resolve().name}_{args.eval_split}'
    if is_main_process():
        atomic_write_json(metrics, out / 'metrics.json')
        print(f'{data} ({args.eval_split}, {metrics["n"]} images): {format_metrics(metrics)}')
        print(f'metrics: {out / "metrics.json"}')
    return metrics


def pred_folder(args):
    """The folder of --pred's reports: --pred_save_path, else OUTPUT_DIR/pred."""
    return Path(args.pred_save_path or Path(args.output_dir) / 'pred')


def run_pred(args, explicit):
    """--pred: predictions.csv, sorted copies and graphs for one or several checkpoints (averaged with
    --several_models True)."""
    data = eval_data(args)
    device = resolve_device(args.device)
    out_root = pred_folder(args)
    groups = [args.resume] if args.several_models else [[c] for c in args.resume]
    outs = [out_root if len(groups) == 1 else out_root / Path(g[0]).parent.name / Path(g[0]).stem for g in groups]
    held = [str(o) for o in outs if (o / 'predictions.csv').exists()]
    if held:
        raise DataError(f'{held[0]}: already holds a prediction report; choose another --pred_save_path')
    results = []
    for group, out in zip(groups, outs):
        probs, indices, frame, run_args = predict_ensemble(group, data, args, explicit, device)
        if not is_main_process():
            continue
        report = write_prediction_report(frame, probs, indices, run_args.nb_classes, out, args.conf,
                                         run_args.soft_label_ratio, args.pred_save, args.pred_save_with_conf,
                                         args.pred_eval, args.pred_eval_name)
        if report['metrics'].get('n'):
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
    args, explicit = parse_with_config(get_args_parser(), argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    check_args(args)
    try:
        if args.pred:
            with folder_lock(pred_folder(args), 'the prediction report folder'):
                return run_pred(args, explicit)
        if args.eval:
            return run_eval(args, explicit)
        with folder_lock(args.output_dir, 'the run folder'):  # one writer per folder, released even on kill -9
            return pretrain.run(args) if args.pretrain else train(args)
    finally:
        cleanup()


if __name__ == '__main__':
    run_cli(main, 'interrupted: checkpoint-last.pth holds the last finished epoch; continue with --auto_resume True')
