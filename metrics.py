"""Metrics of P(defect): the binary fold, 4-class accuracy, calibration (ECE, Brier score), per-type breakdown.

The binary fold counts amb_pos and pos as defects. Calibration compares P(defect) with each sample's reference
defect probability: the annotated one when the list has ``defect_prob`` (ELPV: 0, 1/3, 2/3, 1), else neg 0,
amb_neg 1 - r, amb_pos r, pos 1 (``labels.reference_defect_probability``).
"""
import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, precision_recall_fscore_support,
                             roc_auc_score)

from labels import LABELS, defect_probability, is_defect, reference_defect_probability

LOWER_IS_BETTER = ('loss', 'ece', 'brier')
# What classification_metrics returns (acc4 only for a 4-class head); compute_metrics adds ``<type>/<name>``.
METRIC_NAMES = ('acc', 'precision', 'recall', 'f1', 'auroc', 'ap', 'ece', 'brier', 'acc4',
                *(f'acc_{name}' for name in LABELS), *(f'acc4_{name}' for name in LABELS))
CALIBRATION_BINS = 15  # equal-width P(defect) bins of the ECE and of the reliability diagram


def lower_is_better(name):
    """True for metrics that are minimised: losses, ECE and Brier score.

    ``name`` may carry a prefix: ``ece``, ``val_ece``, ``val/ece``, ``mono/ece``, ``train/epoch_loss`` all count.
    """
    last = str(name).rsplit('/', 1)[-1]
    return any(last == k or last.endswith(f'_{k}') for k in LOWER_IS_BETTER)


def calibration_bins(p, reference, n_bins=CALIBRATION_BINS):
    """Equal-width binning of P(defect), with the mean prediction and mean reference probability of each bin.

    Args:
        p: float array [N], predicted P(defect) in [0, 1] (1.0 falls into the last bin).
        reference: float array [N], reference defect probability in [0, 1].
        n_bins: int, number of bins over [0, 1].

    Returns:
        dict of arrays [n_bins]: 'count' (int64), 'mean_p' and 'mean_reference' (float64, nan in an empty bin),
        'centre' (float64, bin centres).
    """
    p, reference = np.asarray(p, np.float64), np.asarray(reference, np.float64)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean_p = np.bincount(index, p, minlength=n_bins) / count
        mean_reference = np.bincount(index, reference, minlength=n_bins) / count
    return {'count': count, 'mean_p': mean_p, 'mean_reference': mean_reference,
            'centre': (np.arange(n_bins) + 0.5) / n_bins}


def expected_calibration_error(p, reference, n_bins=CALIBRATION_BINS):
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017) with equal-width bins.

    ECE = sum over bins b of (n_b / N) * |mean(p in b) - mean(reference in b)|. The reference may be soft (a defect
    probability per sample) rather than 0/1.

    Args:
        p: float array [N], predicted P(defect) in [0, 1].
        reference: float array [N], reference defect probability in [0, 1].
        n_bins: int, number of bins over [0, 1].

    Returns:
        float in [0, 1] (nan for N = 0).
    """
    if len(p) == 0:
        return float('nan')
    bins = calibration_bins(p, reference, n_bins)
    used = bins['count'] > 0
    gaps = np.abs(bins['mean_p'][used] - bins['mean_reference'][used])
    return float((bins['count'][used] / len(p) * gaps).sum())


def brier_score(p, reference):
    """Brier score: mean squared difference between P(defect) and the reference probability (Brier 1950).

    Args: float arrays [N]. Returns: float (nan for N = 0).
    """
    p, reference = np.asarray(p, np.float64), np.asarray(reference, np.float64)
    return float(np.mean((p - reference) ** 2)) if len(p) else float('nan')


def reference_probabilities(labels, annotated=None, soft_label_ratio=0.7):
    """Reference defect probability per sample.

    Args:
        labels: int array [N] of label indices (LABELS order).
        annotated: optional float array [N], annotated probabilities (nan where unknown).
        soft_label_ratio: r for the ambiguous labels when unannotated.

    Returns:
        float64 array [N].
    """
    table = reference_defect_probability(soft_label_ratio)
    ref = np.array([table[LABELS[k]] for k in labels], np.float64)
    if annotated is not None:
        annotated = np.asarray(annotated, np.float64)
        ref = np.where(np.isnan(annotated), ref, annotated)
    return ref


def classification_metrics(probs, labels, reference, conf=0.5):
    """Metrics of one set of predictions.

    Args:
        probs: float array [N, 2] (neg, pos) or [N, 4] (LABELS order), class probabilities.
        labels: int array [N], label indices (LABELS order); all known.
        reference: float array [N], reference defect probabilities.
        conf: decision threshold on P(defect).

    Returns:
        dict: n, acc, precision, recall, f1 (of the defect class), auroc, ap (nan when one class only), ece, brier,
        acc_<label> (binary-fold accuracy within each label present), and for a 4-class head acc4 and
        acc4_<label>.
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    p = defect_probability(probs)
    y = is_defect(labels)
    pred = (p >= conf).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average='binary', pos_label=1,
                                                               zero_division=0)
    both = len(np.unique(y)) == 2
    out = {'n': int(len(y)), 'acc': float(accuracy_score(y, pred)), 'precision': float(precision),
           'recall': float(recall), 'f1': float(f1),
           'auroc': float(roc_auc_score(y, p)) if both else float('nan'),
           'ap': float(average_precision_score(y, p)) if both else float('nan'),
           'ece': expected_calibration_error(p, reference), 'brier': brier_score(p, reference)}
    for k, name in enumerate(LABELS):
        if (labels == k).any():
            out[f'acc_{name}'] = float((pred[labels == k] == y[labels == k]).mean())
    if probs.shape[1] == 4:
        pred4 = probs.argmax(1)
        out['acc4'] = float((pred4 == labels).mean())
        for k, name in enumerate(LABELS):
            if (labels == k).any():
                out[f'acc4_{name}'] = float((pred4[labels == k] == k).mean())
    return out


def compute_metrics(probs, labels, reference, types=None, conf=0.5):
    """``classification_metrics`` on all samples with a known label, and per type (keys ``<type>/<metric>``).

    Args:
        probs: float array [N, C]. labels: int array [N] (-1 = unknown, excluded). reference: float array [N].
        types: optional array [N] of type names (e.g. mono, poly); None or all-missing for no breakdown.
        conf: decision threshold on P(defect).

    Returns:
        dict metric -> float (empty when no sample has a label).
    """
    labels = np.asarray(labels)
    known = labels >= 0
    if not known.any():
        return {}
    out = classification_metrics(probs[known], labels[known], np.asarray(reference)[known], conf)
    if types is not None:
        types = np.asarray(types, dtype=object)[known]
        names = sorted({t for t in types if isinstance(t, str)})
        for t in names if len(names) > 1 else []:
            m = types == t
            for key, value in classification_metrics(probs[known][m], labels[known][m],
                                                     np.asarray(reference)[known][m], conf).items():
                out[f'{t}/{key}'] = value
    return out


def check_metric_name(name):
    """Raise ValueError unless ``name`` (optionally ``<type>/<name>``) is one of ``METRIC_NAMES``."""
    if str(name).rsplit('/', 1)[-1] not in METRIC_NAMES:
        raise ValueError(f'{name!r} is not a metric; one of {", ".join(METRIC_NAMES[:9])}, acc_<label>, '
                         f'acc4_<label>, optionally as <type>/<metric>')


def is_better(metric, value, best):
    """True if ``value`` improves on ``best`` for ``metric`` (``lower_is_better``: loss, ECE, Brier).

    A nan ``value`` never improves; any non-nan value improves on a missing (None or nan) ``best``.
    """
    if best is None or (isinstance(best, float) and np.isnan(best)):
        return not np.isnan(value)
    return value < best if lower_is_better(metric) else value > best
