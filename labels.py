"""The label vocabulary: the four annotations, head classes, and the defect probability of a label or a prediction.

Every sample carries one of four annotations, always indexed in this order (the alphabetical folder order):

    LABELS = [amb_neg, amb_pos, neg, pos]      (label index 0..3, int64; -1 = unknown)

A 4-class head predicts in that same order; a 2-class head predicts [neg, pos]. The binary fold counts amb_pos and
pos as defects. Users name their folders as they like and map them with ``--label_list crack=pos ok=neg``.
"""
import numpy as np

from utils import DataError

LABELS = ('amb_neg', 'amb_pos', 'neg', 'pos')
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}
HEAD_CLASSES = {2: ('neg', 'pos'), 4: LABELS}
DEFECT_LABELS = ('amb_pos', 'pos')
# Defect probability of the certain labels; the ambiguous ones take theirs from the soft-label ratio r.
HARD_DEFECT_PROBABILITY = {'neg': 0.0, 'pos': 1.0}


def label_indices(names):
    """Label indices (LABELS order) of a sequence of label names; -1 for a missing or unknown one.

    Returns:
        int64 numpy array [N].
    """
    return np.array([LABEL_INDEX.get(x, -1) if isinstance(x, str) else -1 for x in names], np.int64)


def is_defect(labels):
    """Binary fold of label indices: 1 for amb_pos and pos, else 0.

    Args:
        labels: int array [N] of label indices (LABELS order).

    Returns:
        int64 numpy array [N].
    """
    return np.isin(np.asarray(labels), [LABEL_INDEX[k] for k in DEFECT_LABELS]).astype(np.int64)


def check_ratio(name, value):
    """Return ``value`` as a float if it lies in [0, 1].

    Raises:
        ValueError: one line naming the flag ``--name`` and the offending value.
    """
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'--{name} must lie in [0, 1], got {value}')
    return value


def head_classes(nb_classes):
    """Class names of a head with ``nb_classes`` outputs, in output order.

    Raises:
        ValueError: ``nb_classes`` is neither 2 nor 4.
    """
    if nb_classes not in HEAD_CLASSES:
        raise ValueError(f'--nb_classes must be 2 or 4, got {nb_classes}')
    return HEAD_CLASSES[nb_classes]


def reference_defect_probability(soft_label_ratio=0.7):
    """Defect probability that stands for each label when the data set annotates none.

    Returns:
        dict label -> float: neg 0, amb_neg 1 - r, amb_pos r, pos 1 (r = ``soft_label_ratio``).
    """
    r = check_ratio('soft_label_ratio', soft_label_ratio)
    return {**HARD_DEFECT_PROBABILITY, 'amb_neg': 1.0 - r, 'amb_pos': r}


def defect_probability(probs):
    """P(defect) from a head's class probabilities.

    Args:
        probs: float tensor or array [N, 2] (neg, pos) or [N, 4] (amb_neg, amb_pos, neg, pos), rows summing to 1.

    Returns:
        [N] of the same type: p(pos), or p(pos) + p(amb_pos) for 4 classes.

    Raises:
        ValueError: the last dimension is neither 2 nor 4.
    """
    if probs.shape[-1] == 2:
        return probs[..., 1]
    if probs.shape[-1] == 4:
        return probs[..., LABEL_INDEX['pos']] + probs[..., LABEL_INDEX['amb_pos']]
    raise ValueError(f'expected 2 or 4 class probabilities, got shape {tuple(probs.shape)}')


def parse_label_list(items):
    """The folder-to-label mapping of ``--label_list``.

    Args:
        items: None, a dict folder -> label, or a sequence of ``folder=label`` strings (as the command line gives
            them, and as a run's saved args hold them).

    Returns:
        dict folder name -> label (empty for None).

    Raises:
        DataError: an item without '=' or a target that is not one of the four labels.
    """
    pairs = items.items() if isinstance(items, dict) else [
        item.split('=', 1) if '=' in str(item) else (item, None) for item in items or []]
    mapping = {}
    for folder, label in pairs:
        if label is None:
            raise DataError(f'--label_list item "{folder}" must look like folder=label')
        if label not in LABELS:
            raise DataError(f'--label_list item "{folder}={label}": label must be one of {", ".join(LABELS)}')
        mapping[str(folder)] = label
    return mapping
