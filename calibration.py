"""After training, on the validation split: temperature scaling of the probabilities (``--calibrate True``) and the
operating threshold on P(defect) that reaches a target defect recall (``--target_recall R``).

Both are stored in ``checkpoint-best.pth`` (keys ``temperature`` and ``threshold``); prediction mode applies the
temperature and uses the threshold unless ``--conf`` is given.
"""
import math

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve

from labels import defect_probability, is_defect

EPS = 1e-7


def apply_temperature(probs, temperature):
    """Class probabilities rescaled by a temperature: softmax(log(probs) / T).

    Since softmax is shift-invariant, log(probs) equals the logits up to a constant, so this is temperature scaling
    of the logits (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

    Args:
        probs: float array [N, C] of class probabilities. temperature: float > 0 (1: unchanged).
    Returns:
        float32 array [N, C].
    """
    probs = np.asarray(probs, np.float64)
    if temperature == 1.0 or len(probs) == 0:
        return probs.astype(np.float32)
    z = np.log(np.clip(probs, EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(probs, targets, iterations=100):
    """The temperature minimising the cross-entropy of ``apply_temperature(probs, T)`` against ``targets``.

    Optimises log T with L-BFGS (torch) from T = 1 (Guo et al. 2017: one scalar fitted on held-out data).

    Args:
        probs: float array [N, C], class probabilities. targets: float array [N, C], target distributions (soft
            or one-hot; rows sum to 1).
    Returns:
        float, T in [0.05, 20].
    Raises:
        ValueError: shapes that differ or no sample.
    """
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    if probs.shape != targets.shape or len(probs) == 0:
        raise ValueError(f'fit_temperature needs probs and targets of one shape [N, C], got {probs.shape} and '
                         f'{targets.shape}')
    logp = torch.from_numpy(np.log(np.clip(probs, EPS, 1.0)))
    target = torch.from_numpy(targets)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iterations, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = -(target * torch.log_softmax(logp / log_t.exp(), dim=1)).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(min(max(math.exp(log_t.item()), 0.05), 20.0))


def threshold_for_recall(p_defect, defect, target_recall):
    """The operating threshold on P(defect) whose defect recall is at least ``target_recall`` with the best precision.

    Among the thresholds of scikit-learn's ``precision_recall_curve`` (every distinct P(defect)) that keep recall
    >= target, the one with the highest precision; of equal precisions, the highest threshold.

    Args:
        p_defect: float array [N]. defect: int or bool array [N], 1 for a defect. target_recall: float in (0, 1].
    Returns:
        float threshold (images with P(defect) >= threshold are called defects).
    Raises:
        ValueError: target outside (0, 1], or no defect among the samples.
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f'--target_recall must lie in (0, 1], got {target_recall}')
    defect = np.asarray(defect).astype(int)
    if defect.sum() == 0:
        raise ValueError('--target_recall needs defects in the validation split')
    precision, recall, thresholds = precision_recall_curve(defect, np.asarray(p_defect, np.float64))
    ok = np.flatnonzero(recall[:-1] >= target_recall - 1e-12)  # the last point (recall 0) has no threshold
    best = ok[np.lexsort((thresholds[ok], precision[:-1][ok]))[-1]]
    return float(thresholds[best])


def operating_point(probs, labels, reference, calibrate, target_recall):
    """Temperature and threshold fitted on validation predictions.

    Args:
        probs: float array [N, C] (2- or 4-class head). labels: int array [N] of label indices (LABELS order).
        reference: float array [N], reference P(defect) (the targets of a 2-class head).
        calibrate: bool, fit a temperature. target_recall: float or None.
    Returns:
        dict with 'temperature' (float, 1.0 without calibration) and 'threshold' (float or None).
    """
    temperature = 1.0
    if calibrate:
        if probs.shape[1] == 2:
            targets = np.stack([1 - reference, reference], axis=1)
        else:
            targets = np.eye(probs.shape[1])[labels]
        temperature = fit_temperature(probs, targets)
    threshold = None
    if target_recall is not None:
        p = defect_probability(apply_temperature(probs, temperature))
        threshold = threshold_for_recall(p, is_defect(labels), target_recall)
    return {'temperature': temperature, 'threshold': threshold}
