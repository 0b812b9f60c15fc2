"""Metrics against hand-computed values, and the reliability diagram's content."""
import numpy as np
import pytest

from labels import LABEL_INDEX
from metrics import (CALIBRATION_BINS, brier_score, calibration_bins, classification_metrics,
                     expected_calibration_error, is_better, lower_is_better)


def test_ece_hand_computed():
    # one sample per bin: ECE is the mean gap |p - reference| = (0.1 + 0.2 + 0.2 + 0.1) / 4
    assert expected_calibration_error([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(0.15)
    # the bins matter: two predictions sharing a bin average out, in separate bins they do not
    assert expected_calibration_error([0.1, 0.3], [0.3, 0.1], n_bins=2) == pytest.approx(0.0)
    assert expected_calibration_error([0.1, 0.3], [0.3, 0.1], n_bins=15) == pytest.approx(0.2)
    # soft reference (ELPV's 1/3, 2/3): weighted by bin size, 3 of 4 samples in the bin of 0.5
    p, ref = [0.5, 0.5, 0.5, 1.0], [1 / 3, 2 / 3, 1.0, 1.0]
    assert expected_calibration_error(p, ref) == pytest.approx(0.75 * abs(0.5 - 2 / 3))
    assert np.isnan(expected_calibration_error([], []))


def test_brier_hand_computed():
    assert brier_score([0.2, 0.9], [0, 1]) == pytest.approx((0.04 + 0.01) / 2)
    assert brier_score([0.5], [1 / 3]) == pytest.approx(1 / 36)
    assert np.isnan(brier_score([], []))


def test_calibration_bins_edges_and_counts():
    bins = calibration_bins([0.0, 1 / 15 - 1e-9, 1 / 15, 1.0], [0, 0, 1, 1])
    assert len(bins['count']) == CALIBRATION_BINS
    assert bins['count'][0] == 2 and bins['count'][1] == 1 and bins['count'][-1] == 1  # 1.0 in the last bin
    assert bins['count'].sum() == 4 and np.isnan(bins['mean_p'][5])


def test_metrics_with_one_class_and_four_classes():
    neg, amb_neg = LABEL_INDEX['neg'], LABEL_INDEX['amb_neg']
    out = classification_metrics(np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([neg, amb_neg]), np.zeros(2))
    assert np.isnan(out['auroc']) and np.isnan(out['ap'])  # one class only: undefined, not an error
    assert out['acc'] == 0.5 and out['acc_neg'] == 1.0 and out['acc_amb_neg'] == 0.0
    # 4-class head in LABELS order (amb_neg, amb_pos, neg, pos); P(defect) = p(amb_pos) + p(pos)
    probs = np.array([[0.7, 0.1, 0.1, 0.1],   # amb_neg, predicted amb_neg, P(defect) 0.2
                      [0.1, 0.6, 0.2, 0.1],   # amb_pos, predicted amb_pos, 0.7
                      [0.05, 0.15, 0.2, 0.6],  # neg, predicted pos, 0.75
                      [0.0, 0.2, 0.0, 0.8]])  # pos, predicted pos, 1.0
    labels = np.arange(4)
    out = classification_metrics(probs, labels, np.array([1 / 3, 2 / 3, 0, 1]))
    assert out['acc4'] == 0.75 and out['acc4_neg'] == 0.0 and out['acc4_pos'] == 1.0
    assert out['acc'] == 0.75 and out['recall'] == 1.0 and out['precision'] == pytest.approx(2 / 3)
    assert out['auroc'] == pytest.approx(0.75)  # defect 0.7, 1.0 vs fine 0.2, 0.75: 3 of 4 pairs ordered
    assert out['brier'] == pytest.approx(((0.2 - 1 / 3) ** 2 + (0.7 - 2 / 3) ** 2 + 0.75 ** 2 + 0) / 4)


@pytest.mark.parametrize('metric,value,best,expected', [
    ('auroc', 0.8, 0.7, True), ('auroc', 0.6, 0.7, False), ('ece', 0.05, 0.04, False), ('ece', 0.03, 0.04, True),
    ('val_brier', 0.1, 0.2, True), ('loss', 0.5, 0.4, False), ('acc', 0.5, None, True),
    ('acc', float('nan'), None, False), ('acc', 0.5, float('nan'), True),
])
def test_is_better(metric, value, best, expected):
    assert is_better(metric, value, best) is expected


@pytest.mark.parametrize('name,lower', [
    ('ece', True), ('val_ece', True), ('val/ece', True), ('mono/brier', True), ('train/epoch_loss', True),
    ('pretrain/loss', True), ('auroc', False), ('val/acc', False), ('precision', False), ('f1', False),
])
def test_lower_is_better(name, lower):
    assert lower_is_better(name) is lower


def test_reliability_diagram_draws_the_ece_bins():
    import matplotlib.pyplot as plt
    from plots import reliability_diagram
    fig, ax = plt.subplots()
    p, ref = np.array([0.05, 0.06, 0.5, 0.99]), np.array([0.0, 0.2, 1.0, 1.0])
    reliability_diagram(ax, p, ref)
    heights = [bar.get_height() for bar in ax.patches]
    assert len(heights) == CALIBRATION_BINS
    assert heights[0] == pytest.approx(0.1) and heights[7] == 1.0 and heights[14] == 1.0
    assert sum(heights) == pytest.approx(2.1)
    assert sorted(t.get_text() for t in ax.texts) == ['1', '1', '2']  # images per bin, empty bins unlabelled
    plt.close(fig)
