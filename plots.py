"""Evaluation graphs of P(defect) drawn with matplotlib and scikit-learn's displays, saved as PNG files."""
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay,  # noqa: E402
                             precision_recall_curve)

from labels import LABELS, is_defect  # noqa: E402
from metrics import calibration_bins  # noqa: E402
from utils import atomic_write  # noqa: E402


def save_figure(fig, path):
    """Save a figure atomically (``utils.atomic_write``; the format follows the suffix) and close it.

    Returns:
        the Path written.
    """
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip('.') or 'png', dpi=120,
                                                 bbox_inches='tight'), mode='wb')
    finally:
        plt.close(fig)
    return path


def reliability_diagram(ax, p_defect, reference):
    """Draw a reliability diagram on ``ax``: per P(defect) bin (``metrics.calibration_bins``, the ECE's bins), a bar
    of the mean reference defect probability, labelled with the number of images in the bin.

    Args:
        ax: matplotlib Axes. p_defect, reference: float arrays [N] in [0, 1].

    Returns:
        the bins (dict of arrays, see ``metrics.calibration_bins``).
    """
    bins = calibration_bins(p_defect, reference)
    n_bins = len(bins['count'])
    ax.bar(bins['centre'], np.nan_to_num(bins['mean_reference']), width=0.9 / n_bins, alpha=0.7,
           label='mean reference probability')
    ax.plot([0, 1], [0, 1], 'k:', lw=1, label='perfect calibration')
    for c, m, n in zip(bins['centre'], bins['mean_reference'], bins['count']):
        if n:
            ax.text(c, m + 0.02, str(n), ha='center', fontsize=6)
    ax.set(xlabel='P(defect)', ylabel='reference defect probability', xlim=(0, 1), ylim=(0, 1.1),
           title='Reliability diagram (numbers: images)')
    ax.legend(loc='upper left', fontsize=8)
    return bins


def draw_graphs(out_dir, p_defect, labels, reference, conf=0.5, probs=None, prefix=''):
    """Draw the evaluation graphs of labelled predictions into ``out_dir``.

    Files (names prefixed by ``prefix``): confusion_matrix.png (binary fold at ``conf``), confusion_matrix4.png (4-class
    head), roc.png, precision_recall.png, histogram.png (P(defect) per true class, ambiguous ones included),
    reliability.png (mean reference probability per P(defect) bin, with counts), threshold.png (precision and
    recall of the defect class against the threshold).

    Args:
        out_dir: folder (created).
        p_defect: float array [N]. labels: int array [N] (LABELS order, all known). reference: float array [N].
        conf: decision threshold. probs: optional float array [N, 4] for the 4-class confusion matrix.

    Returns:
        list of Paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    y = is_defect(labels)
    both = len(np.unique(y)) == 2
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(y, (p_defect >= conf).astype(int), labels=[0, 1],
                                            display_labels=['fine', 'defect'], ax=ax, colorbar=False)
    ax.set_title(f'Confusion matrix (threshold {conf:g})')
    written.append(save_figure(fig, out_dir / f'{prefix}confusion_matrix.png'))

    if probs is not None and probs.shape[1] == 4:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(1), labels=list(range(4)),
                                                display_labels=list(LABELS), ax=ax, colorbar=False)
        ax.set_title('4-class confusion matrix')
        written.append(save_figure(fig, out_dir / f'{prefix}confusion_matrix4.png'))

    if both:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        RocCurveDisplay.from_predictions(y, p_defect, ax=ax, name='P(defect)')
        ax.plot([0, 1], [0, 1], 'k:', lw=1)
        ax.set_title('ROC')
        written.append(save_figure(fig, out_dir / f'{prefix}roc.png'))

        fig, ax = plt.subplots(figsize=(4.5, 4))
        PrecisionRecallDisplay.from_predictions(y, p_defect, ax=ax, name='P(defect)')
        ax.set_title('Precision-recall')
        written.append(save_figure(fig, out_dir / f'{prefix}precision_recall.png'))

        precision, recall, thresholds = precision_recall_curve(y, p_defect)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(thresholds, precision[:-1], label='precision')
        ax.plot(thresholds, recall[:-1], label='recall')
        ax.axvline(conf, color='k', ls=':', lw=1, label=f'threshold {conf:g}')
        ax.set(xlabel='threshold on P(defect)', ylabel='value', xlim=(0, 1), ylim=(0, 1.02),
               title='Precision and recall of the defect class')
        ax.legend()
        written.append(save_figure(fig, out_dir / f'{prefix}threshold.png'))

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    for k, name in enumerate(LABELS):
        if (labels == k).any():
            ax.hist(p_defect[labels == k], bins=bins, alpha=0.5, label=f'{name} ({(labels == k).sum()})')
    ax.axvline(conf, color='k', ls=':', lw=1)
    ax.set(xlabel='P(defect)', ylabel='images', title='P(defect) per true class')
    ax.legend()
    written.append(save_figure(fig, out_dir / f'{prefix}histogram.png'))

    fig, ax = plt.subplots(figsize=(4.5, 4))
    reliability_diagram(ax, p_defect, reference)
    written.append(save_figure(fig, out_dir / f'{prefix}reliability.png'))
    return written
