"""The Python API: Predictor loads checkpoints once and predicts files or arrays as prediction mode does."""
import json

import numpy as np
import pandas as pd
import pytest

import main
from conftest import train_argv
from engine import EVAL_BATCH_FACTOR
from imaging import read_image
from predict import Predictor
from utils import DataError


@pytest.fixture(scope='module')
def trained(elpv_small, tmp_path_factory):
    out = tmp_path_factory.mktemp('api') / 'run'
    main.main(train_argv(elpv_small, out, '--epochs', '1', '--use_amp', 'False', '--channels_last', 'False',
                         '--target_recall', '0.8', '--calibrate', 'True'))
    return out


def test_predictor_on_files_and_arrays_matches_prediction_mode(trained, elpv_small, tmp_path):
    pred = tmp_path / 'pred'
    main.main(['--pred', 'True', '--resume', str(trained / 'checkpoint-best.pth'), '--eval_data_path',
               str(elpv_small), '--num_workers', '0', '--cache', 'none', '--pred_save_path', str(pred),
               '--use_amp', 'False', '--channels_last', 'False'])
    report = pd.read_csv(pred / 'predictions.csv')
    args = main.get_args_parser().parse_args(['--use_amp', 'False', '--channels_last', 'False'])
    predictor = Predictor([str(trained / 'checkpoint-best.pth')], args, {'use_amp', 'channels_last'})
    paths = list(report['path'])
    table = predictor.predict(paths[:4] + [read_image(p) for p in paths[4:]])
    assert list(table['name'][:4]) == paths[:4] and table['name'][4] == 'image_4'
    np.testing.assert_allclose(table['p_defect'], report['p_defect'], atol=1e-5)
    assert (table['label'] == report['pred']).all()  # the same stored operating threshold
    assert (table['threshold'] == predictor.threshold).all() and predictor.threshold != 0.5
    np.testing.assert_allclose(table['p_neg'] + table['p_pos'], 1, atol=1e-5)


def test_predictor_bad_inputs_are_one_line(trained, tmp_path):
    predictor = Predictor([str(trained / 'checkpoint-best.pth')])
    with pytest.raises(DataError, match='missing.png: file not found'):
        predictor.predict([str(tmp_path / 'missing.png')])
    with pytest.raises(DataError, match='uint8'):
        predictor.predict([np.zeros((8, 8), np.float32)])
    assert len(predictor.predict([])) == 0


def test_predictor_decides_precision_for_inference(trained, precision_cache):
    predictor = Predictor([str(trained / 'checkpoint-best.pth')])  # --use_amp auto --channels_last auto
    keys = [k for k in json.loads(precision_cache.read_text()) if k.endswith(' | inference')]
    member = predictor.members[0].run_args
    assert any(f'{member.input_size}px | batch {member.batch_size * EVAL_BATCH_FACTOR} |' in k for k in keys)


def test_prediction_mode_writes_grad_cam_overlays(trained, elpv_small, tmp_path):
    import cv2
    pred = tmp_path / 'pred'
    main.main(['--pred', 'True', '--resume', str(trained / 'checkpoint-best.pth'), '--eval_data_path',
               str(elpv_small), '--num_workers', '0', '--pred_save_path', str(pred), '--pred_save', 'True',
               '--pred_cam', 'True'])
    table = pd.read_csv(pred / 'predictions.csv')
    overlays = sorted(p.relative_to(pred / 'cam') for p in (pred / 'cam').rglob('*.png'))
    copies = sorted(p.relative_to(pred / 'images') for p in (pred / 'images').rglob('*.png'))
    assert len(overlays) == len(table) == 10 and overlays == copies  # sorted as the copies are
    img = cv2.imread(str(pred / 'cam' / overlays[0]))
    assert img.shape[:2] == (64, 64) and img.std() > 1


def test_grad_cam_follows_the_defect_target(trained):
    """The heatmap is of P(defect): the target is the softmax mass of the defect classes."""
    import torch

    from cam import DefectTarget
    logits = torch.tensor([0.0, 2.0])
    assert DefectTarget(2)(logits).item() == pytest.approx(torch.softmax(logits, 0)[1].item())
    four = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p = torch.softmax(four, 0)
    assert DefectTarget(4)(four).item() == pytest.approx((p[1] + p[3]).item())
