"""Saving and restoring runs: training checkpoints (with RNG state), the resume point, and models for inference.

A training checkpoint (``checkpoint-last.pth``, ``checkpoint-best.pth``) holds everything a run needs to continue
exactly: model, optimizer, LR scheduler, gradient scaler, EMA weights, epoch, best metric so far, the flags (``args``)
and the RNG states; its ``kind`` says which loop wrote it ('classifier' or 'fcmae'). Everything in it loads with
``torch.load(weights_only=True)``, so a checkpoint cannot execute code.
"""
import argparse
import json
import logging
import zipfile
from pathlib import Path

from distributed import is_main_process
from models import build_model, load_pretrained, read_checkpoint
from models.resnet_roadmap import ROADMAP_FLAGS
from utils import DataError, atomic_torch_save, atomic_write_text, rng_state, set_rng_state

log = logging.getLogger('checkpoint')
KINDS = ('classifier', 'fcmae')
# flags that describe the model and its input: for --eval/--pred they come from the checkpoint unless given
CHECKPOINT_FLAGS = ('model', 'nb_classes', 'in_chans', 'input_size', 'normalize', 'crop_pct', 'use_bbox', 'padding',
                    'padding_size', 'soft_label_ratio', 'test_val_ratio', 'seed', 'split_seed', 'label_list',
                    'use_softlabel', 'layer_scale_init_value', 'norm_layer', 'global_pool', 'clahe', 'clahe_grid',
                    'blackhat', 'rot90', 'scale', *ROADMAP_FLAGS)
# rot90: whether --tta may turn the images (engine.tta_mode); scale: with --clahe/--blackhat, the side of the cached
# images they run on (runtime.make_cache), so --eval/--pred see the inputs the run's own test saw


def check_output_dir(args):
    """Refuse an output folder that already holds a run unless resuming (nothing is ever overwritten silently).

    Raises:
        DataError: ``--output_dir`` holds checkpoint-last.pth, finished.json or log.txt and no resume was asked.
    """
    out = Path(args.output_dir)
    held = [n for n in ('checkpoint-last.pth', 'finished.json', 'log.txt') if (out / n).exists()]
    if held and not (args.resume or args.auto_resume):
        raise DataError(f'{out}: already holds a run ({", ".join(held)}); pass --auto_resume True to continue it, '
                        f'or choose another --output_dir')


def resume_point(args):
    """Where a run in ``--output_dir`` starts: ``--resume``, else with ``--auto_resume`` its checkpoint-last.pth
    (checkpoint-best.pth, with a warning, when checkpoint-last.pth cannot be read).

    Returns:
        (checkpoint path or None, the finished.json summary when ``--auto_resume`` finds the run finished, else None).

    Raises:
        DataError: checkpoint-last.pth unreadable and no checkpoint-best.pth to fall back on.
    """
    out = Path(args.output_dir)
    if args.auto_resume and (out / 'finished.json').is_file():
        print(f'{out}: run already finished; nothing to do')
        return None, json.loads((out / 'finished.json').read_text())
    if args.resume:
        return args.resume[0], None
    last, best = out / 'checkpoint-last.pth', out / 'checkpoint-best.pth'
    if not (args.auto_resume and last.is_file()):
        return None, None
    try:  # torch.save writes a zip file whose index sits at its end: a truncated file has none (cheap to check)
        zipfile.ZipFile(last).close()
        return str(last), None
    except (zipfile.BadZipFile, OSError) as e:  # e.g. cut short by a full disk or an interrupted copy
        if not best.is_file():
            raise DataError(f'{last}: unreadable checkpoint ({e.__class__.__name__}); remove it to start the run '
                            f'again, or pass --resume with another checkpoint') from None
        log.warning(f'{last} is unreadable; continuing from {best} instead (the epochs after it run again)')
        return str(best), None


def save_checkpoint(path, kind, model, optimizer, epoch, args, *, lr_scheduler=None, scaler=None, model_ema=None,
                    state=None):
    """Write a full training checkpoint atomically (``utils.atomic_torch_save``).

    Args:
        path: file to write. kind: one of ``KINDS``. model: the unwrapped module. epoch: int, the finished epoch.
        args: argparse.Namespace of the run. state: dict of loop state (best metric, best epoch...) stored at the top
            level.
    """
    atomic_torch_save({
        'kind': kind, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'epoch': epoch, 'args': dict(vars(args)), 'rng': rng_state(), **(state or {}),
    }, path)


def save_weights(path, model, epoch, args, **extra):
    """Write an inference checkpoint atomically: the weights of ``model`` under 'model' (kind 'classifier'), the
    epoch and the run's args, plus ``extra`` entries at the top level. ``--eval``/``--pred``/``--finetune`` read it
    like checkpoint-best.pth; it cannot continue a run (no optimizer state)."""
    atomic_torch_save({'kind': 'classifier', 'model': model.state_dict(), 'epoch': epoch, 'args': dict(vars(args)),
                       **extra}, path)


def checkpoint_kind(ckpt):
    """Which loop wrote a training checkpoint: its ``kind``, or for older files the ``pretrain`` flag it saved."""
    return ckpt.get('kind') or ('fcmae' if ckpt.get('args', {}).get('pretrain') else 'classifier')


def load_model_state(model, state_dict, path):
    """Load a checkpoint's weights strictly.

    Raises:
        DataError: naming the file, when the weights belong to another model.
    """
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][1:2]
        raise DataError(f'{path}: checkpoint does not fit --model {model.__class__.__name__} '
                        f'({first[0][:160] if first else "keys differ"})') from None


def restore_checkpoint(path, kind, model, optimizer, *, lr_scheduler=None, scaler=None, model_ema=None):
    """Continue a run from a training checkpoint: weights, optimizer, scheduler, scaler, EMA and RNG states.

    Args:
        path: checkpoint written by ``save_checkpoint``. kind: the loop that continues ('classifier' or 'fcmae').

    Returns:
        (int epoch to start at, dict of the loop state saved at the checkpoint's top level).

    Raises:
        DataError: unreadable file, not a training checkpoint, a checkpoint of the other kind, or of another model.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'optimizer' not in ckpt or 'epoch' not in ckpt:
        raise DataError(f'{path}: not a training checkpoint of main.py (use --finetune for plain weights)')
    if checkpoint_kind(ckpt) != kind:
        hint = 'continue it with --pretrain True' if checkpoint_kind(ckpt) == 'fcmae' else \
            'FCMAE pretraining continues only its own checkpoints'
        raise DataError(f'{path}: a {checkpoint_kind(ckpt)} checkpoint cannot continue a {kind} run ({hint}; '
                        f'to start from its weights use --finetune)')
    load_model_state(model, ckpt['model'], path)
    optimizer.load_state_dict(ckpt['optimizer'])
    if lr_scheduler is not None and ckpt.get('lr_scheduler'):
        lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if model_ema is not None and ckpt.get('model_ema'):
        model_ema.module.load_state_dict(ckpt['model_ema'])
    if ckpt.get('rng'):
        set_rng_state(ckpt['rng'])
    start_epoch = ckpt['epoch'] + 1
    log.info(f'resumed from {path} at epoch {start_epoch}')
    state = {k: v for k, v in ckpt.items() if k not in ('kind', 'model', 'optimizer', 'lr_scheduler', 'scaler',
                                                        'model_ema', 'epoch', 'args', 'rng')}
    return start_epoch, state


def trim_log(path, start_epoch):
    """Drop the JSON lines of epochs >= ``start_epoch`` from a run's log.txt (a run killed after logging an epoch but
    before its checkpoint logs it again on resume; killed before its first checkpoint, it starts again at epoch 0 and
    all its lines go). Main process only; atomic."""
    path = Path(path)
    if not is_main_process() or not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get('epoch', -1) < start_epoch]
    atomic_write_text(''.join(f'{line}\n' for line in kept), path)


def effective_args(args, saved, explicit):
    """A copy of ``args`` (argparse.Namespace) with the architecture and preprocessing flags (``CHECKPOINT_FLAGS``) a
    model was saved with (dict ``saved``), except those the user gave (set ``explicit``)."""
    run_args = argparse.Namespace(**vars(args))
    for k in CHECKPOINT_FLAGS:
        if k in saved and k not in explicit:
            setattr(run_args, k, saved[k])
    return run_args


def load_for_inference(path, args, explicit):
    """Build the model a checkpoint was trained as and load its weights.

    Architecture and preprocessing flags (``CHECKPOINT_FLAGS``) come from the checkpoint's saved args unless given
    on the command line.

    Args:
        path: checkpoint file. args: argparse.Namespace of main.py. explicit: set of flag names given by the user.

    Returns:
        (model on CPU in eval mode, argparse.Namespace of the effective flags plus ``temperature`` (float, 1.0 when
        the checkpoint has none) and ``threshold`` (float or None), the operating point ``--calibrate`` and
        ``--target_recall`` stored in it).

    Raises:
        DataError: unreadable checkpoint or weights of another architecture.
    """
    ckpt = read_checkpoint(path)
    run_args = effective_args(args, ckpt.get('args', {}) if isinstance(ckpt, dict) else {}, explicit)
    model = build_model(run_args)
    key = 'model_ema' if 'model_ema' in args.model_key.split('|')[0] and ckpt.get('model_ema') else 'model'
    if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
        load_model_state(model, ckpt[key], path)
    else:
        load_pretrained(model, path, args.model_key)
    run_args.temperature = float(ckpt.get('temperature') or 1.0) if isinstance(ckpt, dict) else 1.0
    run_args.threshold = ckpt.get('threshold') if isinstance(ckpt, dict) else None
    return model.eval(), run_args


def add_operating_point(path, point):
    """Store an operating point (dict with 'temperature' and 'threshold') in a checkpoint file, atomically."""
    ckpt = read_checkpoint(path)
    ckpt.update({k: point[k] for k in ('temperature', 'threshold')})
    atomic_torch_save(ckpt, path)
