"""Train, evaluate and predict with ConvNeXt on defect images with soft labels.

    python main.py --data_path data/elpv --model convnext_atto --nb_classes 2 --use_softlabel True \
        --output_dir output/elpv
    python main.py --eval True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv
    python main.py --pred True --resume output/elpv/checkpoint-best.pth --eval_data_path data/elpv \
        --pred_save_path output/elpv/pred --pred_save True --pred_eval True

This file is the wiring: it parses and checks the flags (defined in flags.py), then runs one mode as a short
sequence of steps whose rules live in the modules it calls (runtime, checkpoint, engine, datasets, models).
"""
import argparse
import logging
import sys
import time
from math import nan
from pathlib import Path

from timm.utils import ModelEmaV3

from budget import TimeBudget
from calibration import apply_temperature, operating_point
from checkpoint import (add_operating_point, check_output_dir, restore_checkpoint, resume_point, save_checkpoint,
                        save_weights, trim_log)
import pretrain
from config import parse_with_config
from distributed import barrier, cleanup, is_main_process, world_size
from distributed import rank as get_rank
from engine import (build_loss, build_lr_scheduler, build_optimizer, evaluate, format_metrics, frame_metrics,
                    predict_probs, prediction_table, sample_info, train_one_epoch, tta_mode, write_prediction_report)
from flags import check_args, get_args_parser
from metrics import is_better
from models import build_model, load_pretrained, read_checkpoint
from predict import Predictor, predict_checkpoint
from runlog import RunLog
from runtime import (device_settings, load_training_data, make_dataset, make_loader, prepare_model, resolve_device,
                     seed_loader, settle_workers, training_loaders)
from utils import DataError, atomic_write_csv, atomic_write_json, folder_lock, run_cli, seed_everything

log = logging.getLogger('main')


def validate(model, model_ema, data, dev, args, epoch):
    """Validation metrics of an epoch: (metrics dict, EMA metrics dict (empty without --model_ema_eval), log entries
    val_* and val_ema_*)."""
    if data.val_loader is None:
        return {}, {}, {}
    metrics, _, _ = evaluate(model, data.val_loader, dev, data.val_set.frame, conf=args.conf,
                             soft_label_ratio=args.soft_label_ratio, desc=f'val {epoch}')
    entries = {f'val_{k}': v for k, v in metrics.items()}
    ema_metrics = {}
    if model_ema is not None and args.model_ema_eval:
        ema_metrics, _, _ = evaluate(model_ema.module, data.val_loader, dev, data.val_set.frame, conf=args.conf,
                                     soft_label_ratio=args.soft_label_ratio, desc='val ema')
        entries.update({f'val_ema_{k}': v for k, v in ema_metrics.items()})
    return metrics, ema_metrics, entries


def track_best(state, metric, metrics, epoch):
    """Update the best-epoch state with an epoch's validation metrics; True when the epoch is the new best.

    Without a validation split, or with ``--best_metric last``, every epoch counts as the best (the last one is
    kept: no selection on a small, noisy validation split).

    Raises:
        DataError: ``metric`` is not ``last`` and this run's validation does not give it (e.g. ``acc4`` of a
            2-class head; ``flags.check_args`` has already refused names that are no metric at all).
    """
    selects = bool(metrics) and metric != 'last'
    if selects and metric not in metrics:
        raise DataError(f'--best_metric {metric}: this run\'s validation does not give it (it gives '
                        f'{", ".join(k for k in metrics if k not in ("n", "skipped"))})')
    value = metrics.get(metric, float('nan'))
    improved = is_better(metric, value, state['best_metric']) if selects else True
    if improved:
        state.update(best_metric=value if selects else None, best_epoch=epoch, stale_epochs=0)
    else:
        state['stale_epochs'] += 1
    return improved


def track_best_ema(state, metric, ema_metrics, epoch):
    """The same for the EMA weights (--model_ema_eval): True when their validation ``metric`` is the best so far
    (state keys best_ema_metric, best_ema_epoch), or every epoch with ``last``. False without EMA metrics."""
    value = ema_metrics.get(metric, nan)
    if not ema_metrics or (metric != 'last' and not is_better(metric, value, state['best_ema_metric'])):
        return False
    state.update(best_ema_metric=value, best_ema_epoch=epoch)
    return True


def fit_operating_point(args, model, data, dev, best):
    """--calibrate / --target_recall: temperature and threshold fitted on the validation split with the best
    weights, stored in checkpoint-best.pth. Returns the dict (temperature 1.0 and threshold None when not asked)."""
    point = {'temperature': 1.0, 'threshold': None}
    if not (args.calibrate or args.target_recall is not None):
        return point
    if data.val_loader is None:
        raise DataError('--calibrate and --target_recall need a validation split (--test_val_ratio TEST VAL > 0)')
    probs, indices = predict_probs(model, data.val_loader, dev, 'val (operating point)',
                                   tta_mode(args.tta, args.rot90))
    labels, reference, _ = sample_info(data.val_set.frame, args.soft_label_ratio)
    try:
        point = operating_point(probs, labels[indices], reference[indices], args.calibrate, args.target_recall)
    except ValueError as e:
        raise DataError(str(e)) from None
    if is_main_process():
        add_operating_point(best, point)
        print(f'operating point on validation: temperature {point["temperature"]:.3f}' +
              ('' if point['threshold'] is None else f', threshold {point["threshold"]:.4f} for defect recall >= '
                                                     f'{args.target_recall}'))
    return point


def metrics_at_operating_point(args, model, data, dev, point):
    """Test metrics of the loaded model at the operating point (with the uncalibrated ECE and Brier score, and the
    miss rate at a --target_recall threshold), and its prediction table (``engine.prediction_table``, calibrated
    probabilities): returns (metrics dict, DataFrame)."""
    test_set = make_dataset(data.splits['test'], args, False, data.cache)
    probs, indices = predict_probs(model, make_loader(test_set, args, dev.device, False), dev, 'test',
                                   tta_mode(args.tta, args.rot90))
    conf = args.conf if point['threshold'] is None else point['threshold']
    calibrated = apply_temperature(probs, point['temperature'])
    metrics = frame_metrics(test_set.frame, calibrated, indices, conf, args.soft_label_ratio)
    if args.calibrate:
        raw = frame_metrics(test_set.frame, probs, indices, conf, args.soft_label_ratio)
        metrics.update(temperature=point['temperature'], ece_uncalibrated=raw.get('ece'),
                       brier_uncalibrated=raw.get('brier'))
    if point['threshold'] is not None:
        metrics.update(threshold=point['threshold'], target_recall=args.target_recall,
                       miss_rate=1 - metrics['recall'] if 'recall' in metrics else None)
    return metrics, prediction_table(test_set.frame, calibrated, indices, args.nb_classes, conf)


def test_best(args, model, data, dev, state, epochs_run):
    """Evaluate checkpoint-best.pth on the test split (--test True); write test_predictions.csv (one row per test
    image, ``engine.prediction_table``), metrics.json and finished.json.

    With --calibrate / --target_recall the operating point is fitted on validation first (fit_operating_point) and
    the test metrics are taken at it. With --model_ema_eval the best EMA weights (checkpoint-best-ema.pth) are
    tested the same way into metrics_ema.json and the summary's ``test_ema``.

    Returns:
        dict: the summary written to finished.json.
    """
    out = Path(args.output_dir)
    summary = {'epochs_run': epochs_run, 'best_epoch': state['best_epoch'] + 1, 'best_metric': args.best_metric,
               'best_value': state['best_metric'], 'skipped_images': state['skipped_images']}
    if state['best_ema_epoch'] >= 0:
        summary.update(best_ema_epoch=state['best_ema_epoch'] + 1, best_ema_value=state['best_ema_metric'])
    barrier()  # the best checkpoints are complete on disk
    for name, file, epoch, what in (('', 'checkpoint-best.pth', state['best_epoch'], 'best checkpoint'),
                                    ('_ema', 'checkpoint-best-ema.pth', state['best_ema_epoch'], 'best EMA weights')):
        best = out / file
        if epoch < 0 or not best.is_file() or not (args.test or args.calibrate or args.target_recall is not None):
            continue
        model.load_state_dict(read_checkpoint(best)['model'])
        point = fit_operating_point(args, model, data, dev, best)
        if not name:
            summary.update({k: v for k, v in point.items() if v is not None and (k != 'temperature' or args.calibrate)})
        if args.test and len(data.splits['test']):
            metrics, table = metrics_at_operating_point(args, model, data, dev, point)
            summary[f'test{name}'] = metrics
            if is_main_process():
                atomic_write_csv(table, out / f'test_predictions{name}.csv')  # what results_table.py --ensemble reads
                atomic_write_json(metrics, out / f'metrics{name}.json')
                print(f'test ({what}, epoch {epoch + 1}): {format_metrics(metrics)}')
    if is_main_process():
        if state['skipped_images']:
            print(f'warning: {state["skipped_images"]} unreadable image(s) skipped (see the log)')
        atomic_write_json(summary, out / 'finished.json')
    return summary


def save_epoch(out, runlog, args, epoch, model, optimizer, improved, ema_improved, **parts):
    """An epoch's checkpoints in ``out``: checkpoint-best.pth when the epoch is the new best, checkpoint-best-ema.pth
    when its EMA weights are, and checkpoint-last.pth; ``parts`` are ``save_checkpoint``'s keyword arguments."""
    if improved:
        save_checkpoint(out / 'checkpoint-best.pth', 'classifier', model, optimizer, epoch, args, **parts)
        runlog.checkpoint(out / 'checkpoint-best.pth', ['best', f'epoch-{epoch + 1}'])
    if ema_improved:
        save_weights(out / 'checkpoint-best-ema.pth', parts['model_ema'].module, epoch, args)
        runlog.checkpoint(out / 'checkpoint-best-ema.pth', ['best-ema', f'epoch-{epoch + 1}'])
    save_checkpoint(out / 'checkpoint-last.pth', 'classifier', model, optimizer, epoch, args, **parts)


def epoch_line(args, state, record, metrics, ema_metrics):
    """The line printed after an epoch: training loss, validation metrics, the kept epoch, EMA, seconds."""
    best, shown = state['best_metric'], 'auroc' if args.best_metric == 'last' else args.best_metric
    kept = 'kept: last epoch' if args.best_metric == 'last' or not metrics else \
        f'best {shown} {best if best is None else round(best, 4)} (epoch {state["best_epoch"] + 1})'
    ema = '' if not ema_metrics else \
        f'EMA {shown} {ema_metrics.get(shown, nan):.4f} (best epoch {state["best_ema_epoch"] + 1}) | '
    return (f'epoch {record["epoch"] + 1}/{args.epochs} loss {record["train_loss"]:.4f} | '
            f'val {format_metrics(metrics) or "(no split)"} | {kept} | {ema}{record["time_s"]:.0f}s')


def test_reserve(args, data, val_s):
    """Seconds a ``--time_budget`` run keeps for its test evaluation: the validation's ``val_s`` scaled to the test
    split's size and, with ``--tta``, to its views (4 flips, or 8 with turns: ``tta_mode``); 0 without ``--test`` or
    a validation split."""
    n_val, n_test = len(data.splits.get('val', ())), len(data.splits.get('test', ()))
    views = {None: 1, 'flips': 4, 'dihedral': 8}[tta_mode(args.tta, args.rot90)]
    return val_s * views * n_test / n_val if args.test and n_val else 0.0


def train(args):
    """Train with validation each epoch; write checkpoints, log.txt, TensorBoard events; test the best checkpoint.

    Under torchrun every process trains on its shard (DistributedDataParallel) and metrics are computed on the
    predictions gathered from all processes; only rank 0 writes files.

    Returns:
        dict: the summary written to finished.json.
    """
    t_run = time.time()
    check_output_dir(args)
    if not args.data_path:
        raise DataError('--data_path is required to train')
    out = Path(args.output_dir)
    resume, finished = resume_point(args)
    if finished is not None:
        return finished
    seed_everything(args.seed)

    # build: data, model, optimisation
    device = resolve_device(args.device)
    data = load_training_data(args, device)
    model = build_model(args)
    if args.finetune:
        load_pretrained(model, args.finetune, args.model_key)
    updates_per_epoch = max(1, len(data.train_loader) // args.update_freq)
    dev = device_settings(args, device, steps=args.epochs * len(data.train_loader))  # precision and --compile
    settle_workers(args, dev, data.train_set, lambda: build_model(args), args.epochs)  # --num_workers -1
    data.train_loader, data.val_loader = training_loaders(data.train_set, data.val_set, args, device)  # with them
    run_model = prepare_model(model, args, dev)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    optimizer, lr_scheduler = build_optimizer(model, args, updates_per_epoch)
    scaler = dev.grad_scaler()
    criterion, mixup_fn = build_loss(args, data.train_set.frame, dev.device)
    log.info(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; '
             f'{world_size()} process(es) on {dev.device}, effective batch '
             f'{args.batch_size * args.update_freq * world_size()} ({args.batch_size} x {args.update_freq} '
             f'accumulation x {world_size()} processes), lr {args.lr:g}, {updates_per_epoch} updates per epoch, '
             f'{data.train_loader.num_workers} loader worker(s)')

    # restore
    state = {'best_metric': None, 'best_epoch': -1, 'stale_epochs': 0, 'skipped_images': 0,
             'best_ema_metric': None, 'best_ema_epoch': -1, 'time_budget': None}
    start_epoch = 0
    if resume:
        start_epoch, saved = restore_checkpoint(resume, 'classifier', model, optimizer, lr_scheduler=lr_scheduler,
                                                scaler=scaler, model_ema=model_ema)
        state.update({k: saved[k] for k in state if k in saved})
    budget = TimeBudget(args.time_budget, args.epochs, state['time_budget'], resume, t_run)
    args.epochs = budget.length
    trim_log(out / 'log.txt', start_epoch)  # also a first epoch logged by a run killed before its first checkpoint

    # epoch loop
    runlog = RunLog(args, start_epoch, len(data.train_loader))
    try:  # logs flushed and closed on any exit, an error or Ctrl-C included
        epoch = start_epoch - 1
        for epoch in range(start_epoch, budget.most):  # ends at budget.length
            t0 = time.time()
            seed_everything(args.seed + epoch + 1000 * get_rank())  # same order and augmentation, resumed or not
            seed_loader(data.train_loader, args.seed, epoch)
            stats = train_one_epoch(run_model, criterion, data.train_loader, optimizer, dev, epoch,
                                    lr_scheduler=lr_scheduler, scaler=scaler, model_ema=model_ema,
                                    mixup_fn=mixup_fn, update_freq=args.update_freq, clip_grad=args.clip_grad,
                                    writer=runlog)
            lr_scheduler.step(epoch + 1)
            t_val = time.time()
            metrics, ema_metrics, val_entries = validate(model, model_ema, data, dev, args, epoch)
            lr_scheduler = budget.end_epoch(epoch + 1, time.time() - t0 - stats['warmup_s'],
                                            test_reserve(args, data, time.time() - t_val), lr_scheduler,
                                            lambda n: build_lr_scheduler(optimizer, args, updates_per_epoch, n,
                                                                         (epoch + 1) * updates_per_epoch))
            args.epochs, state['time_budget'] = budget.length, budget.state()
            improved = track_best(state, args.best_metric, metrics, epoch)
            ema_improved = track_best_ema(state, args.best_metric, ema_metrics, epoch)
            state['skipped_images'] = max(state['skipped_images'], stats['skipped'])
            record = {'epoch': epoch, 'train_loss': stats['loss'], 'lr': stats['lr'],
                      'train_images': stats['images'], **val_entries, 'time_s': round(time.time() - t0, 1),
                      'data_time_s': round(stats['data_time'], 1)}
            runlog.epoch(record, {'train/epoch_loss': stats['loss'],
                                  **{f'val/{k[4:]}': v for k, v in val_entries.items()}})
            if is_main_process():  # after the log line: a kill in between resumes here and trims the line
                save_epoch(out, runlog, args, epoch, model, optimizer, improved, ema_improved,
                           lr_scheduler=lr_scheduler, scaler=scaler, model_ema=model_ema, state=state)
                print(epoch_line(args, state, record, metrics, ema_metrics), flush=True)
            if args.early_stop and state['stale_epochs'] >= args.early_stop_epoch:
                if is_main_process():
                    print(f'early stop: no better val {args.best_metric} for {args.early_stop_epoch} epochs')
                break
            if epoch + 1 >= args.epochs:  # the length --time_budget fixed, shortened or lengthened
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
    metrics = frame_metrics(frame, probs, indices, decision_threshold(args, explicit, run_args),
                            run_args.soft_label_ratio)
    if not metrics.get('n'):
        raise DataError(f'{data}: no labelled image to evaluate; use --pred True for unlabelled images')
    out = Path(args.output_dir) if 'output_dir' in explicit else \
        Path(args.resume[0]).parent / 'eval' / f'{Path(data).resolve().name}_{args.eval_split}'
    if is_main_process():
        atomic_write_json(metrics, out / 'metrics.json')
        print(f'{data} ({args.eval_split}, {metrics["n"]} images): {format_metrics(metrics)}')
        print(f'metrics: {out / "metrics.json"}')
    return metrics


def decision_threshold(args, explicit, run_args):
    """The threshold on P(defect) of --eval/--pred: --conf when given, else the checkpoint's --target_recall
    threshold, else --conf's default."""
    if 'conf' in explicit or run_args.threshold is None:
        return args.conf
    log.info(f'operating threshold {run_args.threshold:.4f} from the checkpoint (--target_recall); --conf overrides')
    return run_args.threshold


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
        predictor = Predictor(group, args, explicit, device)
        probs, indices, frame = predictor.predict_frame(data)
        if not is_main_process():
            continue
        run_args = argparse.Namespace(**vars(predictor.run_args))
        run_args.threshold = None if len(group) > 1 else run_args.threshold  # a member's is its own
        report = write_prediction_report(frame, probs, indices, run_args.nb_classes, out,
                                         decision_threshold(args, explicit, run_args),
                                         run_args.soft_label_ratio, args.pred_save, args.pred_save_with_conf,
                                         args.pred_eval, args.pred_eval_name,
                                         cams=predictor.cams if args.pred_cam else None)
        if report['metrics'].get('n'):
            print(f'{data} ({len(report["table"])} images): {format_metrics(report["metrics"])}')
        if report['metrics']['skipped']:
            print(f'warning: {report["metrics"]["skipped"]} unreadable image(s) skipped')
        print(f'prediction report: {out} (predictions.csv' + (', images/' if args.pred_save else '') +
              (', cam/' if args.pred_cam else '') + (', graphs/' if report['graphs'] else '') + ')')
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
