"""Training, evaluation and the prediction mode (CSV, images sorted into folders, graphs)."""
import contextlib
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from distributed import all_reduce_sum, gather_predictions, is_main_process
from metrics import compute_metrics, reference_probabilities
from plots import draw_graphs
from softLabelLoss import LABELS, defect_probability, head_classes, label_indices
from utils import atomic_write_csv

log = logging.getLogger('engine')


def autocast_context(device, use_amp, amp_dtype='bfloat16'):
    """Autocast context for a device: bf16 on CPU; fp16 or bf16 on CUDA; a null context when ``use_amp`` is False.

    Returns:
        a context manager.
    """
    if not use_amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if (device.type == 'cuda' and amp_dtype == 'float16') else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, lr_scheduler=None, scaler=None,
                    model_ema=None, mixup_fn=None, update_freq=1, clip_grad=None, use_amp=False, amp_dtype='bfloat16',
                    writer=None, print_freq=20, memory_format=torch.contiguous_format):
    """Train for one epoch.

    Each batch is (float32 images [B, C, H, W], int64 labels [B] in LABELS order, int64 sample indices [B]); batches
    whose images were all skipped are None. Targets come from ``criterion.targets`` and, with ``mixup_fn`` (timm
    ``Mixup`` with ``multi_label=True``), are mixed with the same lambda as the images. Gradients accumulate over
    ``update_freq`` batches; the LR scheduler (timm) steps per optimizer update; EMA (timm ``ModelEmaV3``) updates
    after each optimizer step. Under torchrun, ``model`` is the DistributedDataParallel wrapper and the returned
    loss, image and skip counts are summed over all processes. ``memory_format``: torch.channels_last for NHWC.

    Returns:
        dict: loss (mean over batches), lr (last), images (seen), skipped (images the loader skipped), updates,
        data_time (seconds waiting for batches).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    updates_per_epoch = max(1, n_batches // update_freq)
    update_count = epoch * updates_per_epoch
    losses, seen, loaded = [], 0, 0
    expected = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)
    bar = tqdm(loader, desc=f'train {epoch}', leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=None if is_main_process() else True)
    data_time, t_wait = 0.0, time.perf_counter()
    for it, batch in enumerate(bar):
        data_time += time.perf_counter() - t_wait
        if batch is None:
            continue
        images, labels, _ = batch
        loaded += len(images)
        if mixup_fn is not None and len(images) % 2:  # timm's Mixup needs an even batch
            images, labels = images[:-1], labels[:-1]
        if len(images) == 0:
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        targets = criterion.targets(labels)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast_context(device, use_amp, amp_dtype):
            logits = model(images)
        loss = criterion(logits, labels, targets)
        loss_value = loss.item()  # one device sync per step
        if not math.isfinite(loss_value):
            raise FloatingPointError(f'loss is {loss_value} at epoch {epoch}, step {it}; lower --lr or check data')
        seen += len(images)
        losses.append(loss_value)
        scaled = loss / update_freq
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (it + 1) % update_freq == 0 or it + 1 == n_batches:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_count += 1
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=update_count)
            if model_ema is not None:
                model_ema.update(model, step=update_count)
        lr = optimizer.param_groups[0]['lr']
        if it % print_freq == 0:
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}')
        if writer is not None:
            step = epoch * n_batches + it
            writer.add_scalar('train/loss', loss_value, step)
            writer.add_scalar('train/lr', lr, step)
        t_wait = time.perf_counter()
    n_losses = all_reduce_sum(len(losses))
    return {'loss': all_reduce_sum(sum(losses)) / n_losses if n_losses else float('nan'),
            'lr': optimizer.param_groups[0]['lr'], 'images': int(all_reduce_sum(seen)),
            'skipped': int(all_reduce_sum(expected - loaded)), 'updates': update_count, 'data_time': data_time}


@torch.inference_mode()
def predict_probs(model, loader, device, use_amp=False, amp_dtype='bfloat16', desc='eval',
                  memory_format=torch.contiguous_format):
    """Class probabilities of every image the loader yields, gathered from all processes under torchrun.

    Returns:
        (float32 array [N, C] softmax probabilities, int64 array [N] sample indices, sorted); images skipped by the
        loader are absent.
    """
    model.eval()
    probs, indices = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                      disable=None if is_main_process() else True):
        if batch is None:
            continue
        images, _, index = batch
        with autocast_context(device, use_amp, amp_dtype):
            logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
        probs.append(logits.float().softmax(-1).cpu())
        indices.append(index)
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, 0), np.float32)
    indices = torch.cat(indices).numpy() if indices else np.zeros(0, np.int64)
    return gather_predictions(probs, indices)


def sample_info(frame, soft_label_ratio=0.7):
    """Labels, reference defect probabilities and types of a sample list, as arrays [N] aligned with its rows."""
    labels = label_indices(frame['label'] if 'label' in frame.columns else [None] * len(frame))
    annotated = frame['defect_prob'].to_numpy(np.float64) if 'defect_prob' in frame.columns else None
    reference = reference_probabilities(np.maximum(labels, 0), annotated, soft_label_ratio)
    types = frame['type'].to_numpy(object) if 'type' in frame.columns else None
    return labels, reference, types


def evaluate(model, loader, device, frame, conf=0.5, soft_label_ratio=0.7, use_amp=False, amp_dtype='bfloat16',
             desc='eval', memory_format=torch.contiguous_format):
    """Evaluate a model on a labelled sample list.

    Args:
        model: classifier with a 2- or 4-class head. loader: DataLoader over ``DefectDataset(frame)``.
        frame: the sample list (label, optional defect_prob, optional type). conf: threshold on P(defect).

    Returns:
        (metrics dict from ``metrics.compute_metrics`` plus 'skipped', float32 probs [N', C], int64 indices [N']).
    """
    probs, indices = predict_probs(model, loader, device, use_amp, amp_dtype, desc, memory_format)
    labels, reference, types = sample_info(frame, soft_label_ratio)
    metrics = compute_metrics(probs, labels[indices], reference[indices],
                              None if types is None else types[indices], conf) if len(indices) else {}
    metrics['skipped'] = int(len(frame) - len(indices))
    return metrics, probs, indices


def _unique_path(path):
    """``path``, or ``path`` with _1, _2 ... before the suffix if it exists already."""
    path, i = Path(path), 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f'{path.stem}_{i}{path.suffix}')
        i += 1
    return candidate


def prediction_table(frame, probs, indices, nb_classes, conf=0.5):
    """The prediction table: one row per predicted image.

    Columns: path, label (true, when known), p_<class> per head class, p_defect, pred (neg/pos at ``conf``),
    pred4 (argmax, 4-class head), correct (binary fold; empty when unlabelled).

    Returns:
        pandas DataFrame.
    """
    rows = frame.iloc[indices].reset_index(drop=True)
    table = pd.DataFrame({'path': rows['path']})
    if 'label' in rows.columns:
        table['label'] = rows['label']
    for i, name in enumerate(head_classes(nb_classes)):
        table[f'p_{name}'] = probs[:, i]
    table['p_defect'] = defect_probability(probs)
    table['pred'] = np.where(table['p_defect'] >= conf, 'pos', 'neg')
    if nb_classes == 4:
        table['pred4'] = [LABELS[k] for k in probs.argmax(1)]
    if 'label' in table.columns:
        known = table['label'].isin(LABELS)
        truth = table['label'].isin(['amb_pos', 'pos'])
        table['correct'] = np.where(known, (truth == (table['pred'] == 'pos')), None)
    return table


def save_predictions(table, out_dir, with_conf=False):
    """Copy each image into ``out_dir/images/<true>/<pred>/`` (``images/<pred>/`` when unlabelled).

    With ``with_conf`` the file name starts with P(defect), e.g. ``0.873_cell0001.png``. Names never overwrite each
    other (a suffix _1, _2 ... is added).

    Returns:
        int, number of files copied.
    """
    for row in table.itertuples(index=False):
        label = getattr(row, 'label', None)
        folder = Path(out_dir) / 'images'
        if isinstance(label, str):
            folder = folder / label
        folder = folder / row.pred
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(row.path).name
        if with_conf:
            name = f'{row.p_defect:.3f}_{name}'
        shutil.copy2(row.path, _unique_path(folder / name))
    return len(table)


def write_prediction_report(frame, probs, indices, nb_classes, out_dir, conf=0.5, soft_label_ratio=0.7,
                            pred_save=False, with_conf=False, pred_eval=False, eval_name=''):
    """Write the prediction report into ``out_dir``: predictions.csv, sorted images, graphs, metrics.json.

    Args:
        frame: sample list predicted on. probs: float array [N', C]. indices: int array [N'] into ``frame``.
        nb_classes: 2 or 4. conf: threshold on P(defect). pred_save, with_conf: copy images sorted into folders.
        pred_eval: draw graphs into ``out_dir/graphs/`` (labelled images only), names prefixed by ``eval_name``.

    Returns:
        dict: 'table' (DataFrame), 'metrics' (dict, empty when unlabelled), 'graphs' (list of Paths).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = prediction_table(frame, probs, indices, nb_classes, conf)
    atomic_write_csv(table, out_dir / 'predictions.csv')
    labels, reference, types = sample_info(frame, soft_label_ratio)
    labels, reference = labels[indices], reference[indices]
    metrics = compute_metrics(probs, labels, reference, None if types is None else types[indices], conf)
    metrics['skipped'] = int(len(frame) - len(indices))
    if pred_save:
        save_predictions(table, out_dir, with_conf)
    graphs = []
    known = labels >= 0
    if pred_eval and known.any():
        prefix = f'{eval_name}_' if eval_name else ''
        graphs = draw_graphs(out_dir / 'graphs', table['p_defect'].to_numpy()[known], labels[known],
                             reference[known], conf, probs[known] if nb_classes == 4 else None, prefix)
    elif pred_eval:
        log.warning('--pred_eval True: no labelled image, no graph drawn')
    return {'table': table, 'metrics': metrics, 'graphs': graphs}


def format_metrics(metrics, keys=('acc', 'auroc', 'f1', 'ece', 'brier', 'acc4')):
    """One-line summary of the main metrics, e.g. ``acc 0.8512 auroc 0.9021 ...``."""
    return ' '.join(f'{k} {metrics[k]:.4f}' for k in keys if k in metrics)


__all__ = ['autocast_context', 'evaluate', 'format_metrics', 'predict_probs', 'prediction_table',
           'save_predictions', 'train_one_epoch', 'write_prediction_report']
