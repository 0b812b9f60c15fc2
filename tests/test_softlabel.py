import math

import pytest
import torch

from softLabelLoss import LABELS, SoftLabelLoss, defect_probability, soft_target_table

r, q = 0.7, 0.9


def row(table, label, classes):
    """Target of ``label`` as a dict class -> weight (zeros left out)."""
    t = table[LABELS.index(label)]
    return {c: round(float(v), 6) for c, v in zip(classes, t) if v != 0}


TWO = ('neg', 'pos')
FOUR = LABELS


@pytest.mark.parametrize('label,expected', [
    ('neg', {'neg': 1.0}), ('amb_neg', {'neg': 1.0}), ('amb_pos', {'pos': 1.0}), ('pos', {'pos': 1.0})])
def test_two_class_hard(label, expected):
    assert row(soft_target_table(2, False, r, q), label, TWO) == expected


@pytest.mark.parametrize('label,expected', [
    ('neg', {'neg': q, 'pos': 1 - q}), ('amb_neg', {'neg': r, 'pos': 1 - r}),
    ('amb_pos', {'pos': r, 'neg': 1 - r}), ('pos', {'pos': q, 'neg': 1 - q})])
def test_two_class_soft(label, expected):
    assert row(soft_target_table(2, True, r, q), label, TWO) == {k: round(v, 6) for k, v in expected.items()}


@pytest.mark.parametrize('label', LABELS)
def test_four_class_hard(label):
    assert row(soft_target_table(4, False, r, q), label, FOUR) == {label: 1.0}


@pytest.mark.parametrize('soft_type,label,expected', [
    (1, 'neg', {'neg': q, 'amb_neg': 1 - q}), (1, 'amb_neg', {'amb_neg': r, 'amb_pos': 1 - r}),
    (1, 'amb_pos', {'amb_pos': r, 'amb_neg': 1 - r}), (1, 'pos', {'pos': q, 'amb_pos': 1 - q}),
    (2, 'neg', {'neg': q, 'amb_neg': 1 - q}), (2, 'amb_neg', {'amb_neg': r, 'neg': 1 - r}),
    (2, 'amb_pos', {'amb_pos': r, 'pos': 1 - r}), (2, 'pos', {'pos': q, 'amb_pos': 1 - q})])
def test_four_class_soft(soft_type, label, expected):
    table = soft_target_table(4, True, r, q, soft_type)
    assert row(table, label, FOUR) == {k: round(v, 6) for k, v in expected.items()}


def test_rows_sum_to_one_at_extremes():
    for nb in (2, 4):
        for st in (1, 2):
            for ratio in (0.0, 1.0):
                t = soft_target_table(nb, True, ratio, ratio, st)
                assert torch.allclose(t.sum(1), torch.ones(4))


@pytest.mark.parametrize('kwargs,flag', [({'soft_label_ratio': 1.2}, 'soft_label_ratio'),
                                         ({'label_ratio': -0.1}, 'label_ratio')])
def test_ratio_out_of_range(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        soft_target_table(2, True, **kwargs)


def test_bad_nb_classes_and_lossfn():
    with pytest.raises(ValueError, match='nb_classes'):
        soft_target_table(3)
    with pytest.raises(ValueError, match='lossfn'):
        SoftLabelLoss(lossfn='KL')


def test_defect_probability():
    p2 = torch.tensor([[0.2, 0.8]])
    p4 = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # amb_neg, amb_pos, neg, pos
    assert defect_probability(p2).item() == pytest.approx(0.8)
    assert defect_probability(p4).item() == pytest.approx(0.6)


# hand-computed example: logits [0, ln 3] -> softmax [0.25, 0.75]; label amb_neg with r = 0.7 -> target [0.7, 0.3]
LOGITS = torch.tensor([[0.0, math.log(3.0)]])
AMB_NEG = torch.tensor([LABELS.index('amb_neg')])


def test_ce_hand_computed():
    loss = SoftLabelLoss(2, True, 0.7, 1.0, lossfn='CE')(LOGITS, AMB_NEG)
    assert loss.item() == pytest.approx(-(0.7 * math.log(0.25) + 0.3 * math.log(0.75)), rel=1e-6)


def test_bce_hand_computed():
    loss = SoftLabelLoss(2, True, 0.7, 1.0, lossfn='BCE')(LOGITS, AMB_NEG)
    s = 1 / (1 + math.exp(-math.log(3.0)))  # sigmoid(ln 3) = 0.75
    bce0 = -(0.7 * math.log(0.5) + 0.3 * math.log(0.5))
    bce1 = -(0.3 * math.log(s) + 0.7 * math.log(1 - s))
    assert loss.item() == pytest.approx((bce0 + bce1) / 2, rel=1e-6)


def test_mse_and_l1_hand_computed():
    mse = SoftLabelLoss(2, True, 0.7, 1.0, lossfn='MSE')(LOGITS, AMB_NEG)
    l1 = SoftLabelLoss(2, True, 0.7, 1.0, lossfn='L1')(LOGITS, AMB_NEG)
    assert mse.item() == pytest.approx((0.45 ** 2 + 0.45 ** 2) / 2, rel=1e-6)
    assert l1.item() == pytest.approx(0.45, rel=1e-6)


def test_smoothing_and_label_weight():
    # smoothing 0.2 on target [0.7, 0.3] -> [0.66, 0.34]
    loss = SoftLabelLoss(2, True, 0.7, 1.0, smoothing=0.2)(LOGITS, AMB_NEG)
    assert loss.item() == pytest.approx(-(0.66 * math.log(0.25) + 0.34 * math.log(0.75)), rel=1e-6)
    # weights 3 (amb_neg) and 1 (pos): weighted mean of the two per-sample losses
    logits = torch.cat([LOGITS, LOGITS])
    labels = torch.tensor([LABELS.index('amb_neg'), LABELS.index('pos')])
    w = torch.tensor([3.0, 1.0, 1.0, 1.0])
    loss = SoftLabelLoss(2, True, 0.7, 1.0, label_weight=w)(logits, labels)
    l_amb, l_pos = -(0.7 * math.log(0.25) + 0.3 * math.log(0.75)), -math.log(0.75)
    assert loss.item() == pytest.approx((3 * l_amb + l_pos) / 4, rel=1e-6)


def test_mixup_mixes_soft_targets_with_image_lambda():
    from timm.data import Mixup
    mix = Mixup(mixup_alpha=1.0, prob=1.0, num_classes=2, label_smoothing=0.0, multi_label=True)
    crit = SoftLabelLoss(2, True, 0.7, 1.0)
    labels = torch.tensor([LABELS.index('amb_neg'), LABELS.index('pos')])
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    mixed, t = mix(x.clone(), crit.targets(labels))
    lam = 1 - mixed[0].mean().item()  # image 0 = lam * 0 + (1 - lam) * 1
    expected0 = lam * torch.tensor([0.7, 0.3]) + (1 - lam) * torch.tensor([0.0, 1.0])
    assert torch.allclose(t[0], expected0, atol=1e-5)
