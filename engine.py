"""Training, evaluation and the prediction mode (CSV, images sorted into folders, graphs)."""
import contextlib
import inspect
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from datasets import balanced_label_weights
from distributed import all_reduce_sum, gather_predictions, is_distributed, is_main_process
from imaging import write_image
from labels import LABELS, defect_probability, head_classes, is_defect, label_indices
from metrics import compute_metrics, reference_probabilities
from models.depthwise import set_depthwise
from plots import draw_graphs
from softLabelLoss import SoftLabelLoss
from utils import DataError, atomic_write_csv, atomic_write_json, check_finite_loss

log = logging.getLogger('engine')


EVAL_BATCH_FACTOR = 2  # evaluation and prediction loaders take batches this many times the training batch


@dataclass(frozen=True)
class DeviceSettings:
    """Where and in what precision a model runs: the settings that travel together through every loop.

    Args:
        device: torch.device.
        use_amp: autocast the forward pass: bf16 on CPU; fp16 or bf16 (``amp_dtype``) on CUDA.
        amp_dtype: 'bfloat16' or 'float16' (float16 applies on CUDA only, with a gradient scaler).
        channels_last: NHWC memory format for the model and its inputs.
        depthwise_fp32: with ``use_amp``, the depthwise convolutions run in fp32 channels_last outside autocast
            (``models.depthwise``; faster on some CPUs, measured by ``precision.choose``).
        depthwise_wgrad: 'forward_conv' (the depthwise convolutions' weight gradient by their forward kernel when
            training on the CPU, ``models.depthwise``) or 'native' (PyTorch's backward).
    """
    device: torch.device = torch.device('cpu')
    use_amp: bool = False
    amp_dtype: str = 'bfloat16'
    channels_last: bool = False
    depthwise_fp32: bool = False
    depthwise_wgrad: str = 'forward_conv'

    @property
    def memory_format(self):
        """torch.channels_last or torch.contiguous_format."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """Autocast context (``torch.autocast``) for these settings; a null context without AMP."""
        if not self.use_amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if (self.device.type == 'cuda' and self.amp_dtype == 'float16') else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare(self, model):
        """Move ``model`` (nn.Module, in place) to the device in the memory format, its depthwise convolutions in
        fp32 channels_last when ``depthwise_fp32`` and ``use_amp`` are both set, with their weight gradient by the
        forward kernel on the CPU with ``depthwise_wgrad`` 'forward_conv' (``models.depthwise.set_depthwise``);
        returns ``model``."""
        model.to(self.device, memory_format=self.memory_format)
        set_depthwise(model, fp32=self.use_amp and self.depthwise_fp32,
                      forward_conv_wgrad=self.depthwise_wgrad == 'forward_conv' and self.device.type == 'cpu')
        return model

    def inputs(self, images):
        """A batch of images (float32 [B, C, H, W]) on the device in the memory format (non-blocking copy)."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def grad_scaler(self):
        """``torch.amp.GradScaler`` for fp16 autocast on CUDA (the only case that needs loss scaling), else None."""
        if self.use_amp and self.device.type == 'cuda' and self.amp_dtype == 'float16':
            return torch.amp.GradScaler('cuda')
        return None


def optimizer_class(name):
    """The optimizer class behind a timm optimizer name (``--opt``), e.g. torch.optim.AdamW for 'adamw'.

    A 'lookahead_' prefix (timm wraps the optimizer in Lookahead) is looked through.

    Raises:
        DataError: timm has no optimizer of that name (one line naming --opt).
    """
    try:
        return get_optimizer_class(name.lower().removeprefix('lookahead_'), bind_defaults=False)
    except ValueError:
        raise DataError(f'--opt {name}: timm has no optimizer of that name (e.g. adamw, sgd, lamb; '
                        'timm.optim.list_optimizers() lists them)') from None


def build_optimizer(model, args, updates_per_epoch, **overrides):
    """AdamW (or any timm optimizer) and the per-update LR schedule of a training run, from its flags.

    Uses timm's ``create_optimizer_v2`` (weight decay skipped for every 1-D parameter: norms, biases, LayerScale and
    ConvNeXt V2's GRN gamma/beta, as the ConvNeXt V2 authors advise for fine-tuning; ``--layer_decay``) and
    ``create_scheduler_v2`` (``--sched`` with ``--warmup_epochs`` from ``--warmup_lr``, down to ``--min_lr``), stepped
    per optimizer update. With ``--opt_fused True`` (the default) an optimizer class that has torch's fused
    implementation (torch.optim.Adam, AdamW, SGD) updates all parameters in one kernel instead of several small
    operations per parameter tensor: the AdamW step of convnext_atto (3.4M parameters) takes about 2 ms instead of
    16 on a 2-core CPU. Other optimizers keep their own implementation.

    Args:
        model: nn.Module. args: argparse.Namespace with the optimisation flags of main.py.
        updates_per_epoch: int >= 1, optimizer steps per epoch.
        overrides: keyword arguments for ``create_optimizer_v2`` that replace the flags' (e.g. FCMAE's betas).

    Returns:
        (torch.optim.Optimizer, timm scheduler).

    Raises:
        DataError: an unknown ``--opt`` name.
    """
    options = dict(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                   layer_decay=args.layer_decay)
    if args.opt_eps is not None:
        options['eps'] = args.opt_eps
    if args.opt_betas:
        options['betas'] = tuple(args.opt_betas)
    if args.opt_fused and 'fused' in inspect.signature(optimizer_class(args.opt)).parameters:
        options['fused'] = True
    optimizer = create_optimizer_v2(model, **{**options, **overrides})
    return optimizer, build_lr_scheduler(optimizer, args, updates_per_epoch, args.epochs)


def build_lr_scheduler(optimizer, args, updates_per_epoch, epochs, updates_done=0):
    """timm's per-update LR schedule (``create_scheduler_v2``: ``--sched`` over ``epochs``, ``--warmup_epochs`` from
    ``--warmup_lr``, down to ``--min_lr``), set to update ``updates_done``.

    Built again with another ``epochs`` when ``--time_budget`` fixes or shortens a run's length (``budget.py``): the
    warm-up does not depend on the length (timm computes it from ``warmup_epochs`` alone), so a run whose first epoch
    was warm-up follows, once its length is fixed, the schedule of a run started with that length.

    Args:
        optimizer: torch.optim.Optimizer (its groups' ``initial_lr``, set by the first schedule, is kept).
        updates_per_epoch: int >= 1. epochs: int >= 1, the schedule's length. updates_done: int >= 0.

    Returns:
        timm scheduler, the optimizer's learning rates set for update ``updates_done``.
    """
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=epochs,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, step_on_epochs=False,
                                          updates_per_epoch=max(1, updates_per_epoch))
    if updates_done:
        lr_scheduler.step_update(num_updates=updates_done)
    return lr_scheduler


def build_loss(args, train_frame, device):
    """The training loss and batch mixing of a run, from its flags.

    Args:
        args: argparse.Namespace (nb_classes, use_softlabel, soft_label_ratio, label_ratio, soft_type, lossfn,
            smoothing, class_weight, mixup, cutmix, cutmix_minmax, mixup_prob, mixup_switch_prob, mixup_mode).
        train_frame: the training sample list (for ``--class_weight balanced``). device: torch.device.

    Returns:
        (``softLabelLoss.SoftLabelLoss`` on the device, timm ``Mixup`` with ``multi_label=True`` mixing the soft
        targets, or None when --mixup and --cutmix are off).
    """
    label_weight = balanced_label_weights(train_frame) if args.class_weight == 'balanced' else None
    criterion = SoftLabelLoss(args.nb_classes, args.use_softlabel, args.soft_label_ratio, args.label_ratio,
                              args.soft_type, args.lossfn, args.smoothing, label_weight).to(device)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=0.0, num_classes=args.nb_classes, multi_label=True)
    return criterion, mixup_fn


def optimizer_step(model, optimizer, scaler=None, clip_grad=None):
    """Apply the accumulated gradients: unscale (fp16 ``GradScaler``), clip to the norm ``clip_grad`` when given,
    step, and zero the gradients."""
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


def forward_loss(model, criterion, images, labels, targets, dev):
    """The training loss of one batch under ``dev.autocast()``: a 0-dim float tensor with its autograd graph."""
    with dev.autocast():
        logits = model(images)
    return criterion(logits, labels, targets)


def backward(loss, scaler=None):
    """``loss.backward()``, through the fp16 GradScaler when one is given."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def train_one_epoch(model, criterion, loader, optimizer, dev, epoch, *, lr_scheduler=None, scaler=None,
                    model_ema=None, mixup_fn=None, update_freq=1, clip_grad=None, writer=None, print_freq=20):
    """Train for one epoch.

    Each batch is (float32 images [B, C, H, W], int64 labels [B] in LABELS order, int64 sample indices [B]); batches
    whose images were all skipped are None. Targets come from ``criterion.targets`` and, with ``mixup_fn`` (timm
    ``Mixup`` with ``multi_label=True``), are mixed with the same lambda as the images. Gradients accumulate over
    ``update_freq`` batches; the LR scheduler (timm) steps per optimizer update; EMA (timm ``ModelEmaV3``) updates
    after each optimizer step. Under torchrun, ``model`` is the DistributedDataParallel wrapper and the returned
    loss, image and skip counts are summed over all processes. When ``model`` is a ``runtime.CompiledModule`` whose
    backward graph fails to compile (torch compiles it at the first backward), the model falls back to eager mode and
    the batch is computed again eagerly (one process only; under torchrun the error propagates).

    Args:
        dev: ``DeviceSettings`` (device, autocast, memory format). scaler: GradScaler for fp16, else None.
        writer: optional object with SummaryWriter's ``add_scalar(tag, value, step)`` (a runlog.RunLog or a
            SummaryWriter) for train/loss and train/lr per step.

    Returns:
        dict: loss (mean over batches), lr (last), images (seen), skipped (images the loader skipped), updates,
        data_time (seconds waiting for batches), warmup_s (``warm_up_excess`` of the steps' seconds, this process).

    Raises:
        utils.TrainingDiverged: a non-finite loss (names the epoch, step and learning rate).
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
    data_time, step_times, t_wait = 0.0, [], time.perf_counter()
    for it, batch in enumerate(bar):
        t_step = t_wait
        data_time += time.perf_counter() - t_wait
        if batch is None:
            continue
        images, labels, _ = batch
        loaded += len(images)
        if mixup_fn is not None and len(images) % 2:  # timm's Mixup needs an even batch
            images, labels = images[:-1], labels[:-1]
        if len(images) == 0:
            continue
        images = dev.inputs(images)
        labels = labels.to(dev.device, non_blocking=True)
        targets = criterion.targets(labels)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        loss = forward_loss(model, criterion, images, labels, targets, dev)
        loss_value = check_finite_loss(loss.item(), epoch, it, optimizer.param_groups[0]['lr'])  # one sync per step
        seen += len(images)
        losses.append(loss_value)
        try:
            backward(loss / update_freq, scaler)
        except torch._dynamo.exc.TorchDynamoException as e:  # compiling the backward graph failed
            fall_back = getattr(model, 'fall_back', None)  # runtime.CompiledModule
            if fall_back is None or is_distributed():  # DDP cannot run a second forward before a backward
                raise
            fall_back(e)
            backward(forward_loss(model, criterion, images, labels, targets, dev) / update_freq, scaler)
        if (it + 1) % update_freq == 0 or it + 1 == n_batches:
            optimizer_step(model, optimizer, scaler, clip_grad)
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
        step_times.append(t_wait - t_step)
    n_losses = all_reduce_sum(len(losses))
    return {'loss': all_reduce_sum(sum(losses)) / n_losses if n_losses else float('nan'),
            'lr': optimizer.param_groups[0]['lr'], 'images': int(all_reduce_sum(seen)),
            'skipped': int(all_reduce_sum(expected - loaded)), 'updates': update_count, 'data_time': data_time,
            'warmup_s': warm_up_excess(step_times)}


def warm_up_excess(step_times, first=3):
    """Seconds the first steps of an epoch took beyond the steady state (torch.compile's compilation, oneDNN's and
    the allocator's first calls): their time less ``first`` x the mean of the later steps.

    Args:
        step_times: list of float seconds, one per step in order. first: int, the steps counted as warm-up.

    Returns:
        float >= 0 seconds; 0 for an epoch of ``2 * first`` steps or fewer (too few to tell).
    """
    if len(step_times) <= 2 * first:
        return 0.0
    return max(0.0, sum(step_times[:first]) - first * statistics.fmean(step_times[first:]))


def dihedral_views(images, turns=True):
    """Symmetries of the square of a batch, as test-time augmentation for images with no up or down.

    Args:
        images: float tensor [B, C, H, W] with H == W.
        turns: True gives all eight (four turns, each also mirrored); False the four flips only (identity,
            left-right, up-down, both), for a model trained with flips but no turns (``--rot90 0``).

    Returns:
        list of 8 (or 4) tensors [B, C, H, W], the identity first.
    """
    if not turns:
        return [images, images.flip(-1), images.flip(-2), images.flip(-2, -1)]
    views = []
    for k in range(4):
        turned = torch.rot90(images, k, dims=(-2, -1))
        views += [turned, turned.flip(-1)]
    return views


def tta_mode(tta, rot90):
    """Which views ``predict_probs`` averages: None (``--tta False``), 'dihedral' (the eight symmetries, for a model
    trained with ``--rot90`` > 0) or 'flips' (the four flips: views the model was trained on, no turns)."""
    if not tta:
        return None
    return 'dihedral' if rot90 and rot90 > 0 else 'flips'


@torch.inference_mode()
def predict_probs(model, loader, dev, desc='eval', tta=False):
    """Class probabilities of every image the loader yields, gathered from all processes under torchrun.

    Args:
        model: classifier. loader: DataLoader of (images, labels, indices) batches or None. dev: ``DeviceSettings``.
        tta: None/False (one view), 'dihedral' or True (average the softmax over the eight ``dihedral_views``
            of each image, 8x the compute), or 'flips' (the four flips, 4x; ``tta_mode`` picks it from the run).

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
        views = dihedral_views(images, turns=tta != 'flips') if tta else [images]
        p = 0
        for view in views:
            with dev.autocast():
                logits = model(dev.inputs(view.contiguous()))
            p = p + logits.float().softmax(-1)
        probs.append((p / len(views)).cpu())
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


def frame_metrics(frame, probs, indices, conf=0.5, soft_label_ratio=0.7):
    """Metrics of predictions on (part of) a sample list.

    Args:
        frame: the sample list (label, optional defect_prob, optional type). probs: float array [N', C].
        indices: int array [N'] of the predicted rows of ``frame`` (skipped images absent). conf: threshold on
            P(defect). soft_label_ratio: r of the reference probability of unannotated ambiguous labels.

    Returns:
        dict from ``metrics.compute_metrics`` (empty when no predicted row has a label) plus 'skipped' (rows of
        ``frame`` without a prediction).
    """
    labels, reference, types = sample_info(frame, soft_label_ratio)
    metrics = compute_metrics(probs, labels[indices], reference[indices],
                              None if types is None else types[indices], conf) if len(indices) else {}
    metrics['skipped'] = int(len(frame) - len(indices))
    return metrics


def evaluate(model, loader, dev, frame, *, conf=0.5, soft_label_ratio=0.7, desc='eval', tta=False):
    """Evaluate a model on a labelled sample list (``predict_probs``, then ``frame_metrics``).

    Args:
        model: classifier with a 2- or 4-class head. loader: DataLoader over ``DefectDataset(frame)``.
        dev: ``DeviceSettings``.
        frame: the sample list (label, optional defect_prob, optional type). conf: threshold on P(defect).
        tta: test-time augmentation (see ``predict_probs``).

    Returns:
        (metrics dict, float32 probs [N', C], int64 indices [N']).
    """
    probs, indices = predict_probs(model, loader, dev, desc, tta)
    return frame_metrics(frame, probs, indices, conf, soft_label_ratio), probs, indices


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

    Columns: path, label (true, when known), defect_prob and type (when the sample list has them: the annotated
    defect probability and the cell type, so that ``frame_metrics`` can be computed again from the table alone),
    p_<class> per head class, p_defect, pred (neg/pos at ``conf``), pred4 (argmax, 4-class head), correct (binary
    fold; empty when unlabelled).

    Returns:
        pandas DataFrame.
    """
    rows = frame.iloc[indices].reset_index(drop=True)
    table = pd.DataFrame({'path': rows['path']})
    if 'label' in rows.columns:
        table['label'] = rows['label']
    for column in ('defect_prob', 'type'):
        if column in rows.columns:
            table[column] = rows[column].to_numpy()
    for i, name in enumerate(head_classes(nb_classes)):
        table[f'p_{name}'] = probs[:, i]
    table['p_defect'] = defect_probability(probs)
    table['pred'] = np.where(table['p_defect'] >= conf, 'pos', 'neg')
    if nb_classes == 4:
        table['pred4'] = [LABELS[k] for k in probs.argmax(1)]
    if 'label' in table.columns:
        known = table['label'].isin(LABELS)
        truth = is_defect(label_indices(table['label'])).astype(bool)
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


def save_cams(table, out_dir, cams, chunk=32):
    """Write ``cams(paths)``'s overlays as ``out_dir/cam/<true>/<pred>/<name>.png`` (``cam/<pred>/`` unlabelled).

    Returns:
        int, number of files written.
    """
    if (Path(out_dir) / 'cam').is_dir() and not (Path(out_dir) / 'predictions.csv').exists():
        shutil.rmtree(Path(out_dir) / 'cam')  # overlays of a report that was stopped half-way
    rows = list(table.itertuples(index=False))
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        for row, overlay in zip(part, cams([r.path for r in part])):
            label = getattr(row, 'label', None)
            folder = Path(out_dir) / 'cam' / (label if isinstance(label, str) else '') / row.pred
            write_image(overlay, _unique_path(folder / f'{Path(row.path).stem}.png'))
    return len(rows)


def write_prediction_report(frame, probs, indices, nb_classes, out_dir, conf=0.5, soft_label_ratio=0.7,
                            pred_save=False, with_conf=False, pred_eval=False, eval_name='', cams=None):
    """Write the prediction report into ``out_dir``: sorted images, graphs, metrics.json, then predictions.csv.

    predictions.csv is written last (atomically), so its presence marks a complete report: a report killed half-way
    has none, and the same command writes it again.

    Args:
        frame: sample list predicted on. probs: float array [N', C]. indices: int array [N'] into ``frame``.
        nb_classes: 2 or 4. conf: threshold on P(defect). pred_save, with_conf: copy images sorted into folders.
        pred_eval: draw graphs into ``out_dir/graphs/`` (labelled images only), names prefixed by ``eval_name``.
        cams: optional callable, image paths -> Grad-CAM overlays (``predict.Predictor.cams``): one PNG per image
            under ``out_dir/cam/``, sorted as images/ sorts the copies.

    Returns:
        dict: 'table' (DataFrame), 'metrics' (dict, empty when unlabelled), 'graphs' (list of Paths).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = prediction_table(frame, probs, indices, nb_classes, conf)
    metrics = frame_metrics(frame, probs, indices, conf, soft_label_ratio)
    labels, reference, _ = sample_info(frame, soft_label_ratio)
    labels, reference = labels[indices], reference[indices]
    if pred_save:
        if (out_dir / 'images').is_dir() and not (out_dir / 'predictions.csv').exists():
            shutil.rmtree(out_dir / 'images')  # copies of a report that was stopped half-way
        save_predictions(table, out_dir, with_conf)
    if cams is not None:
        save_cams(table, out_dir, cams)
    graphs = []
    known = labels >= 0
    if pred_eval and known.any():
        prefix = f'{eval_name}_' if eval_name else ''
        graphs = draw_graphs(out_dir / 'graphs', table['p_defect'].to_numpy()[known], labels[known],
                             reference[known], conf, probs[known] if nb_classes == 4 else None, prefix)
    elif pred_eval:
        log.warning('--pred_eval True: no labelled image, no graph drawn')
    if metrics.get('n'):
        atomic_write_json(metrics, out_dir / 'metrics.json')
    atomic_write_csv(table, out_dir / 'predictions.csv')
    return {'table': table, 'metrics': metrics, 'graphs': graphs}


def format_metrics(metrics, keys=('acc', 'auroc', 'f1', 'ece', 'brier', 'acc4')):
    """One-line summary of the main metrics, e.g. ``acc 0.8512 auroc 0.9021 ...``."""
    return ' '.join(f'{k} {metrics[k]:.4f}' for k in keys if k in metrics)


__all__ = ['EVAL_BATCH_FACTOR', 'DeviceSettings', 'build_loss', 'build_optimizer', 'dihedral_views', 'evaluate',
           'format_metrics', 'frame_metrics', 'optimizer_class', 'optimizer_step', 'predict_probs', 'prediction_table',
           'save_predictions', 'train_one_epoch', 'tta_mode', 'write_prediction_report']
