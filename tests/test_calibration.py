"""Temperature scaling and the operating threshold for a target recall (--calibrate, --target_recall)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import main
from calibration import apply_temperature, fit_temperature, threshold_for_recall
from conftest import train_argv
from models import read_checkpoint


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_fit_temperature_recovers_a_known_temperature():
    z = np.random.default_rng(0).normal(0, 3, (400, 2))
    probs, targets = softmax(z), softmax(z / 2.5)  # the model is over-confident by T = 2.5
    temperature = fit_temperature(probs, targets)
    assert temperature == pytest.approx(2.5, rel=1e-3)
    np.testing.assert_allclose(apply_temperature(probs, temperature), targets, atol=1e-4)
    assert fit_temperature(targets, targets) == pytest.approx(1.0, rel=1e-3)


def test_apply_temperature_keeps_the_ranking_and_sums_to_one():
    probs = softmax(np.random.default_rng(1).normal(0, 2, (50, 4)))
    out = apply_temperature(probs, 3.0)
    np.testing.assert_allclose(out.sum(1), 1, atol=1e-6)
    assert (out.argmax(1) == probs.argmax(1)).all() and out.max() < probs.max()
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-7)


def test_threshold_for_recall_hand_example():
    p = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    # recall >= 0.75 needs 3 of 4 defects: threshold 0.6 (precision 3/4) beats 0.4 and 0.35 (lower precision)
    assert threshold_for_recall(p, y, 0.75) == pytest.approx(0.6)
    assert threshold_for_recall(p, y, 1.0) == pytest.approx(0.35)  # all 4 defects: precision 4/6
    assert threshold_for_recall(p, y, 0.5) == pytest.approx(0.8)   # precision 1 at 2 of 4
    with pytest.raises(ValueError, match='target_recall'):
        threshold_for_recall(p, y, 1.5)


def test_training_stores_the_operating_point_and_prediction_uses_it(elpv_small, tmp_path):
    out = tmp_path / 'run'
    summary = main.main(train_argv(elpv_small, out, '--calibrate', 'True', '--target_recall', '0.9',
                                   '--use_amp', 'False', '--channels_last', 'False'))
    ckpt = read_checkpoint(out / 'checkpoint-best.pth')
    assert 0.05 <= ckpt['temperature'] <= 20 and 0 <= ckpt['threshold'] <= 1
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['threshold'] == ckpt['threshold'] == summary['threshold']
    assert metrics['miss_rate'] == pytest.approx(1 - metrics['recall'])
    assert 'ece_uncalibrated' in metrics and metrics['temperature'] == ckpt['temperature']
    torch.load(out / 'checkpoint-best.pth', weights_only=True)  # still a plain checkpoint
    pred = tmp_path / 'pred'
    main.main(['--pred', 'True', '--resume', str(out / 'checkpoint-best.pth'), '--eval_data_path', str(elpv_small),
               '--num_workers', '0', '--pred_save_path', str(pred)])
    table = pd.read_csv(pred / 'predictions.csv')
    assert ((table['p_defect'] >= ckpt['threshold']) == (table['pred'] == 'pos')).all()
    main.main(['--pred', 'True', '--resume', str(out / 'checkpoint-best.pth'), '--eval_data_path', str(elpv_small),
               '--num_workers', '0', '--pred_save_path', str(tmp_path / 'pred_conf'), '--conf', '0.999'])
    assert (pd.read_csv(tmp_path / 'pred_conf' / 'predictions.csv')['pred'] == 'neg').all()
