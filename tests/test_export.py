"""ONNX export (export.py) and prediction mode through onnxruntime."""
import pandas as pd
import pytest

import export
import main
from conftest import train_argv
from utils import DataError

pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def trained(elpv_small, tmp_path_factory):
    out = tmp_path_factory.mktemp('export') / 'run'
    main.main(train_argv(elpv_small, out, '--epochs', '1', '--use_amp', 'False', '--channels_last', 'False',
                         '--target_recall', '0.8'))
    return out


def test_export_matches_pytorch_on_real_images(trained, elpv_small, tmp_path):
    diff = export.main(['--resume', str(trained / 'checkpoint-best.pth'), '--output', str(tmp_path / 'm.onnx'),
                        '--check_data', str(elpv_small)])
    assert diff is not None and diff < 1e-4


def test_prediction_mode_runs_the_onnx_file(trained, elpv_small, tmp_path):
    onnx_file = tmp_path / 'm.onnx'
    export.main(['--resume', str(trained / 'checkpoint-best.pth'), '--output', str(onnx_file)])
    common = ['--pred', 'True', '--eval_data_path', str(elpv_small), '--num_workers', '0', '--use_amp', 'False',
              '--channels_last', 'False']
    main.main([*common, '--resume', str(trained / 'checkpoint-best.pth'), '--pred_save_path', str(tmp_path / 'pt')])
    main.main([*common, '--resume', str(onnx_file), '--pred_save_path', str(tmp_path / 'ox')])
    pt, ox = (pd.read_csv(tmp_path / d / 'predictions.csv') for d in ('pt', 'ox'))
    assert list(pt['path']) == list(ox['path']) and len(pt) == 10
    assert (pt['p_defect'] - ox['p_defect']).abs().max() < 1e-4
    assert (pt['pred'] == ox['pred']).all()  # the same operating threshold travelled in the file


def test_bad_onnx_inputs_are_one_line(trained, elpv_small, tmp_path):
    with pytest.raises(DataError, match='must end in .onnx'):
        export.main(['--resume', str(trained / 'checkpoint-best.pth'), '--output', str(tmp_path / 'm.pt')])
    (tmp_path / 'junk.onnx').write_bytes(b'not a model')
    with pytest.raises(DataError, match='junk.onnx: unreadable ONNX file'):
        main.main(['--pred', 'True', '--resume', str(tmp_path / 'junk.onnx'), '--eval_data_path', str(elpv_small),
                   '--num_workers', '0', '--pred_save_path', str(tmp_path / 'p')])
