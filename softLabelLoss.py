"""Soft-label targets and losses for 2- and 4-class defect heads.

Every sample carries one of four annotations, always indexed in this order (the alphabetical folder order):

    LABELS = [amb_neg, amb_pos, neg, pos]      (label index 0..3, int64)

A 4-class head predicts in that same order; a 2-class head predicts [neg, pos]. ``soft_target_table`` folds the
four annotations into a target distribution over the head's classes, with r = ``soft_label_ratio`` and
q = ``label_ratio``:

| flags                               | neg                 | amb_neg                 | amb_pos                 | pos                 |
|-------------------------------------|---------------------|-------------------------|-------------------------|---------------------|
| 2 classes, hard                     | neg 1               | neg 1                   | pos 1                   | pos 1               |
| 2 classes, soft                     | neg q, pos 1-q      | neg r, pos 1-r          | pos r, neg 1-r          | pos q, neg 1-q      |
| 4 classes, hard                     | one-hot             | one-hot                 | one-hot                 | one-hot             |
| 4 classes, soft, soft_type 1        | neg q, amb_neg 1-q  | amb_neg r, amb_pos 1-r  | amb_pos r, amb_neg 1-r  | pos q, amb_pos 1-q  |
| 4 classes, soft, soft_type 2        | neg q, amb_neg 1-q  | amb_neg r, neg 1-r      | amb_pos r, pos 1-r      | pos q, amb_pos 1-q  |

P(defect) is p(pos) for a 2-class head and p(pos) + p(amb_pos) for a 4-class head (``labels.defect_probability``).
"""
import torch
import torch.nn.functional as F
from torch import nn

# the label vocabulary lives in labels.py; these names stay importable from here for users' scripts
from labels import (HARD_DEFECT_PROBABILITY, HEAD_CLASSES, LABEL_INDEX, LABELS, check_ratio, defect_probability,
                    head_classes, label_indices, reference_defect_probability)

LOSS_FUNCTIONS = ('CE', 'BCE', 'MSE', 'L1')


def soft_target_table(nb_classes=2, use_softlabel=False, soft_label_ratio=0.7, label_ratio=1.0, soft_type=1):
    """Target distribution of each annotation, as the table in this module's docstring.

    Args:
        nb_classes: 2 or 4, the head size.
        use_softlabel: False gives hard (one-hot) targets; True folds the ambiguous labels into soft ones.
        soft_label_ratio: r in [0, 1], the weight an ambiguous sample keeps on its own side.
        label_ratio: q in [0, 1], the weight a certain (neg, pos) sample keeps on its own class.
        soft_type: 1 or 2, which neighbour takes the remaining weight in a 4-class head.

    Returns:
        float32 tensor [4, nb_classes]: row i is the target of label ``LABELS[i]``; every row sums to 1.

    Raises:
        ValueError: a ratio outside [0, 1], ``nb_classes`` not in {2, 4} or ``soft_type`` not in {1, 2}.
    """
    r = check_ratio('soft_label_ratio', soft_label_ratio)
    q = check_ratio('label_ratio', label_ratio)
    classes = head_classes(nb_classes)
    if soft_type not in (1, 2):
        raise ValueError(f'--soft_type must be 1 or 2, got {soft_type}')
    col = {name: i for i, name in enumerate(classes)}
    table = torch.zeros(len(LABELS), nb_classes, dtype=torch.float32)

    def put(label, weights):
        for cls, w in weights.items():
            table[LABEL_INDEX[label], col[cls]] += w

    if nb_classes == 2 and not use_softlabel:
        put('neg', {'neg': 1}), put('amb_neg', {'neg': 1}), put('amb_pos', {'pos': 1}), put('pos', {'pos': 1})
    elif nb_classes == 2:
        put('neg', {'neg': q, 'pos': 1 - q}), put('amb_neg', {'neg': r, 'pos': 1 - r})
        put('amb_pos', {'pos': r, 'neg': 1 - r}), put('pos', {'pos': q, 'neg': 1 - q})
    elif not use_softlabel:
        table = torch.eye(4, dtype=torch.float32)
    else:
        put('neg', {'neg': q, 'amb_neg': 1 - q}), put('pos', {'pos': q, 'amb_pos': 1 - q})
        if soft_type == 1:
            put('amb_neg', {'amb_neg': r, 'amb_pos': 1 - r}), put('amb_pos', {'amb_pos': r, 'amb_neg': 1 - r})
        else:
            put('amb_neg', {'amb_neg': r, 'neg': 1 - r}), put('amb_pos', {'amb_pos': r, 'pos': 1 - r})
    return table


class SoftLabelLoss(nn.Module):
    """Loss of a 2- or 4-class head against soft targets built from the four annotations.

    The target of each sample is a row of ``soft_target_table``; label smoothing (Szegedy et al. 2016) then mixes it
    with the uniform distribution: t = (1 - smoothing) t + smoothing / C.

    Loss functions (``lossfn``), each averaged over the batch with optional per-label weights:
        CE:  cross entropy -sum_c t_c log softmax(z)_c.
        BCE: binary cross entropy with logits against t, mean over classes (``F.binary_cross_entropy_with_logits``).
        MSE: mean squared error between softmax(z) and t, mean over classes.
        L1:  mean absolute error between softmax(z) and t, mean over classes.

    Args:
        nb_classes, use_softlabel, soft_label_ratio, label_ratio, soft_type: see ``soft_target_table``.
        lossfn: one of ``LOSS_FUNCTIONS``.
        smoothing: label smoothing in [0, 1).
        label_weight: optional float tensor [4], a weight per annotation (LABELS order), e.g. balanced class weights.

    Raises:
        ValueError: unknown ``lossfn``, smoothing out of [0, 1), or any error of ``soft_target_table``.
    """

    def __init__(self, nb_classes=2, use_softlabel=False, soft_label_ratio=0.7, label_ratio=1.0, soft_type=1,
                 lossfn='CE', smoothing=0.0, label_weight=None):
        super().__init__()
        if lossfn not in LOSS_FUNCTIONS:
            raise ValueError(f'--lossfn must be one of {", ".join(LOSS_FUNCTIONS)}, got {lossfn}')
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'--smoothing must lie in [0, 1), got {smoothing}')
        self.lossfn, self.smoothing, self.nb_classes = lossfn, float(smoothing), nb_classes
        self.register_buffer('table', soft_target_table(nb_classes, use_softlabel, soft_label_ratio, label_ratio,
                                                        soft_type))
        weight = torch.ones(len(LABELS)) if label_weight is None else torch.as_tensor(label_weight, dtype=torch.float32)
        self.register_buffer('label_weight', weight)

    def targets(self, labels):
        """Target distributions of a batch of annotations.

        Args:
            labels: int64 tensor [B] of label indices (``LABELS`` order).

        Returns:
            float32 tensor [B, nb_classes], before smoothing.
        """
        return self.table[labels]

    def forward(self, logits, labels, targets=None):
        """Loss of a batch.

        Args:
            logits: float tensor [B, nb_classes], raw head outputs (any float dtype; computed in float32).
            labels: int64 tensor [B], label indices; they choose the targets (unless ``targets`` is given) and the
                per-sample weights.
            targets: optional float tensor [B, nb_classes], already built (e.g. mixed by Mixup/CutMix).

        Returns:
            float32 scalar tensor.
        """
        logits = logits.float()
        t = self.targets(labels) if targets is None else targets.float()
        if self.smoothing:
            t = t * (1.0 - self.smoothing) + self.smoothing / self.nb_classes
        if self.lossfn == 'CE':
            per_sample = -(t * F.log_softmax(logits, dim=-1)).sum(-1)
        elif self.lossfn == 'BCE':
            per_sample = F.binary_cross_entropy_with_logits(logits, t, reduction='none').mean(-1)
        elif self.lossfn == 'MSE':
            per_sample = F.mse_loss(logits.softmax(-1), t, reduction='none').mean(-1)
        else:
            per_sample = F.l1_loss(logits.softmax(-1), t, reduction='none').mean(-1)
        w = self.label_weight[labels]
        return (per_sample * w).sum() / w.sum()


__all__ = ['HARD_DEFECT_PROBABILITY', 'HEAD_CLASSES', 'LABEL_INDEX', 'LABELS', 'LOSS_FUNCTIONS', 'SoftLabelLoss',
           'check_ratio', 'defect_probability', 'head_classes', 'label_indices', 'reference_defect_probability',
           'soft_target_table']
